//! Internal queries (serf/internal_query.go): names starting `_serf_`, answered by Serf itself
//! and never shown to the application. `_serf_ping` needs only the generic ack;
//! `_serf_conflict` reports what we know about a node name; the key-management queries
//! (serf/keymanager.go) change or list the shared keyring the driver encrypts with, and answer
//! with Go's texts ("No keyring to modify (encryption not enabled)" without one). [`answer`]
//! only computes the answer from a [`Context`]; the caller sends it.

use std::net::SocketAddr;

use base64::Engine as _;

use super::member::Members;
use super::query::QueryHandle;
use super::Query;
use crate::wire::crypto::SharedKeyring;
use crate::wire::serf::{self as wire, ConflictMember, KeyResponse};

/// Go's `minEncodedKeyLength`: the list-keys answer starts with at most
/// `query_response_size_limit / 25` keys, then drops keys until it fits.
const MIN_ENCODED_KEY_LENGTH: usize = 25;

/// Prefix of internal query names.
pub(crate) const PREFIX: &str = "_serf_";
/// The name-conflict query.
pub(crate) const CONFLICT: &str = "_serf_conflict";

/// What an internal query may read or change of the member.
pub(crate) struct Context<'a> {
    /// The gossip keyring (key queries change it); `None` without encryption.
    pub(crate) keyring: Option<&'a SharedKeyring>,
    /// The member table (`_serf_conflict` reports from it).
    pub(crate) members: &'a Members,
    /// Our node name.
    pub(crate) local_name: &'a str,
    /// The largest query response, in bytes.
    pub(crate) response_limit: usize,
}

/// The answer to an internal query addressed to us, if it gets one; `fits` says whether a
/// payload fits the response size limit (a key list is cut until it does).
pub(crate) fn answer(
    context: &Context<'_>,
    query: &Query,
    fits: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    match &query.name[PREFIX.len()..] {
        "ping" => None,
        "conflict" => answer_conflict(context, query),
        "install-key" | "use-key" | "remove-key" | "list-keys" => {
            Some(answer_key_query(context, query, fits))
        }
        other => {
            tracing::debug!(name = other, "unhandled internal query");
            None
        }
    }
}

/// `_serf_install-key`, `_serf_use-key`, `_serf_remove-key`, `_serf_list-keys` (serf
/// internal_query.go `handleInstallKey` …): change the keyring and say how it went.
fn answer_key_query(context: &Context<'_>, query: &Query, fits: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let operation = &query.name[PREFIX.len()..];
    let mut response = KeyResponse::default();
    match (context.keyring, operation) {
        (None, "list-keys") => {
            response.message = "Keyring is empty (encryption not enabled)".to_owned();
        }
        (None, _) => {
            response.message = "No keyring to modify (encryption not enabled)".to_owned();
        }
        (Some(keyring), "list-keys") => {
            let keyring = keyring.read();
            let engine = base64::engine::general_purpose::STANDARD;
            response.keys = Some(keyring.keys().map(|key| engine.encode(key)).collect());
            response.primary_key = engine.encode(keyring.primary());
            response.result = true;
        }
        (Some(keyring), operation) => match wire::decode_key_request(&query.payload) {
            Err(error) => tracing::debug!(%error, "invalid key request"),
            Ok(key) => {
                let changed = keyring.modify(|ring| match operation {
                    "install-key" => ring.add(&key),
                    "use-key" => ring.use_key(&key),
                    _ => ring.remove(&key),
                });
                match changed {
                    Ok(()) => {
                        tracing::debug!(operation, "keyring changed by key query");
                        response.result = true;
                    }
                    Err(error) => {
                        tracing::debug!(operation, %error, "key query refused");
                        response.message = error;
                    }
                }
            }
        },
    }
    if operation != "list-keys" {
        return response.encode();
    }
    // Go's keyListResponseWithCorrectSize: drop keys until the answer fits the limit, having
    // started from at most limit / 25 keys.
    let actual = response.keys.as_ref().map_or(0, Vec::len);
    let mut shown = actual.min(context.response_limit / MIN_ENCODED_KEY_LENGTH);
    if shown < actual {
        truncate_keys(&mut response, shown, actual);
    }
    loop {
        let encoded = response.encode();
        if shown == 0 || fits(&encoded) {
            return encoded;
        }
        shown -= 1;
        truncate_keys(&mut response, shown, actual);
    }
}

fn truncate_keys(response: &mut KeyResponse, shown: usize, actual: usize) {
    if let Some(keys) = &mut response.keys {
        keys.truncate(shown);
    }
    response.message =
        format!("truncated key list response, showing first {shown} of {actual} keys");
}

/// `_serf_conflict`: the payload is a node name; answer with our view of that member unless
/// the name is ours.
fn answer_conflict(context: &Context<'_>, query: &Query) -> Option<Vec<u8>> {
    let node = String::from_utf8_lossy(&query.payload).into_owned();
    if node == context.local_name {
        return None;
    }
    tracing::debug!(%node, "conflict resolution query");
    let member = context.members.get(&node).map(|member| ConflictMember {
        name: member.name.clone(),
        addr: wire::ip_to_bytes(member.addr),
        port: member.port,
        tags: Some(member.tags.clone()),
        status: i64::from(member.status.as_u8()),
        protocol_min: member.versions[0],
        protocol_max: member.versions[1],
        protocol_cur: member.versions[2],
        delegate_min: member.versions[3],
        delegate_max: member.versions[4],
        delegate_cur: member.versions[5],
    });
    Some(ConflictMember::encode_response(member.as_ref()))
}

/// A `_serf_conflict` query of ours in progress.
#[derive(Debug, Clone)]
pub(crate) struct ConflictResolution {
    pub(crate) query: QueryHandle,
    pub(crate) other: SocketAddr,
    pub(crate) responses: usize,
    pub(crate) matching: usize,
}

impl ConflictResolution {
    /// Counts one answer to our `_serf_conflict` query: does the responder know our name at
    /// our address?
    pub(crate) fn count(&mut self, local: SocketAddr, payload: &[u8]) {
        match ConflictMember::decode_response(payload) {
            Ok(member) => {
                self.responses += 1;
                let matches = member.is_some_and(|member| {
                    wire::ip_from_bytes(&member.addr) == Some(local.ip())
                        && member.port == local.port()
                });
                if matches {
                    self.matching += 1;
                }
            }
            Err(error) => tracing::debug!(%error, "invalid conflict query response"),
        }
    }
}
