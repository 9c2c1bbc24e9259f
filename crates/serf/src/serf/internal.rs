//! Internal queries (serf/internal_query.go): names starting `_serf_`, answered by Serf itself
//! and never shown to the application. `_serf_ping` needs only the generic ack;
//! `_serf_conflict` reports what we know about a node name; the key-management queries
//! (serf/keymanager.go) change or list the shared keyring the driver encrypts with, and answer
//! with Go's texts ("No keyring to modify (encryption not enabled)" without one).

use std::net::SocketAddr;

use super::state::{ConflictResolution, SerfState};
use super::Query;
use base64::Engine as _;

use super::Error;
use crate::wire::serf::{self as wire, ConflictMember, KeyResponse};

/// Go's `minEncodedKeyLength`: the list-keys answer starts with at most
/// `query_response_size_limit / 25` keys, then drops keys until it fits.
const MIN_ENCODED_KEY_LENGTH: usize = 25;

/// Prefix of internal query names.
pub(crate) const PREFIX: &str = "_serf_";
/// The name-conflict query.
pub(crate) const CONFLICT: &str = "_serf_conflict";

/// Answers an internal query addressed to us.
pub(crate) fn handle(state: &mut SerfState, query: &Query) {
    let result = match &query.name[PREFIX.len()..] {
        "ping" => Ok(()),
        "conflict" => answer_conflict(state, query),
        "install-key" | "use-key" | "remove-key" | "list-keys" => answer_key_query(state, query),
        other => {
            tracing::debug!(name = other, "unhandled internal query");
            Ok(())
        }
    };
    if let Err(error) = result {
        tracing::debug!(name = %query.name, %error, "failed to answer internal query");
    }
}

/// `_serf_install-key`, `_serf_use-key`, `_serf_remove-key`, `_serf_list-keys` (serf
/// internal_query.go `handleInstallKey` …): change the keyring and say how it went.
fn answer_key_query(state: &mut SerfState, query: &Query) -> Result<(), Error> {
    let operation = &query.name[PREFIX.len()..];
    let mut response = KeyResponse::default();
    match (&state.keyring, operation) {
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
        return state.respond(query.id, response.encode());
    }
    // Go's keyListResponseWithCorrectSize: drop keys until the answer fits the limit.
    let actual = response.keys.as_ref().map_or(0, Vec::len);
    let mut shown = actual.min(state.config.query_response_size_limit / MIN_ENCODED_KEY_LENGTH);
    if shown < actual {
        truncate_keys(&mut response, shown, actual);
    }
    loop {
        match state.respond(query.id, response.encode()) {
            Err(Error::ResponseTooLarge { .. }) if shown > 0 => {
                shown -= 1;
                truncate_keys(&mut response, shown, actual);
            }
            result => return result,
        }
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
fn answer_conflict(state: &mut SerfState, query: &Query) -> Result<(), super::Error> {
    let node = String::from_utf8_lossy(&query.payload).into_owned();
    if node == state.local_name() {
        return Ok(());
    }
    tracing::debug!(%node, "conflict resolution query");
    let member = state.members.get(&node).map(|member| ConflictMember {
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
    state.respond(query.id, ConflictMember::encode_response(member.as_ref()))
}

/// Counts one answer to our `_serf_conflict` query: does the responder know our name at our
/// address?
pub(crate) fn count_conflict_response(
    conflict: &mut ConflictResolution,
    local: SocketAddr,
    payload: &[u8],
) {
    match ConflictMember::decode_response(payload) {
        Ok(member) => {
            conflict.responses += 1;
            let matches = member.is_some_and(|member| {
                wire::ip_from_bytes(&member.addr) == Some(local.ip()) && member.port == local.port()
            });
            if matches {
                conflict.matching += 1;
            }
        }
        Err(error) => tracing::debug!(%error, "invalid conflict query response"),
    }
}
