//! Serf's push-pull user state (serf/delegate.go `LocalState`, `MergeRemoteState`): member
//! status times, left members, the three clocks and the recent user events, so that a member
//! joining late learns what happened and does not replay old events.

use std::collections::HashSet;

use super::member::IntentOutcome;
use super::state::SerfState;
use super::LamportTime;
use crate::wire::serf::{self as wire, SerfMessage};

/// The most names merged from one push-pull's `StatusLTimes` and, separately, `LeftMembers`
/// (memberlist's own bound on the nodes of one push-pull); a longer list is merged in part.
pub(crate) const MAX_MERGED_NAMES: usize = crate::wire::stream::MAX_PUSH_NODES;

impl SerfState {
    /// `02` + `messagePushPull` with our state.
    pub(crate) fn encode_local_state(&self, _join: bool) -> Vec<u8> {
        let events = self
            .user_events
            .ring()
            .iter()
            .map(|slot| {
                slot.as_ref().map(|slot| wire::UserEvents {
                    ltime: slot.ltime.0,
                    events: slot
                        .events
                        .iter()
                        .map(|(name, payload)| wire::UserEventEntry {
                            name: name.clone(),
                            payload: payload.clone(),
                        })
                        .collect(),
                })
            })
            .collect();
        SerfMessage::PushPull(wire::PushPull {
            ltime: self.members.clock.time().0,
            status_ltimes: self
                .members
                .status_ltimes()
                .into_iter()
                .map(|(name, ltime)| (name, ltime.0))
                .collect(),
            left_members: self.members.left_names(),
            event_ltime: self.user_events.clock.time().0,
            events,
            query_ltime: self.queries.clock.time().0,
        })
        .encode()
    }

    /// Merges a remote push-pull state: clocks, intents, events.
    pub(crate) fn merge_state(&mut self, buf: &[u8], join: bool) {
        let remote = match SerfMessage::decode(buf) {
            Ok(SerfMessage::PushPull(remote)) => remote,
            Ok(_) => {
                tracing::debug!(first = ?buf.first(), "remote state has a bad type prefix");
                return;
            }
            Err(error) => {
                self.decode_errors += 1;
                tracing::debug!(%error, len = buf.len(), "remote state does not decode");
                return;
            }
        };
        if remote.ltime > 0 {
            self.members.clock.witness(LamportTime(remote.ltime - 1));
        }
        if remote.event_ltime > 0 {
            self.user_events
                .clock
                .witness(LamportTime(remote.event_ltime - 1));
        }
        if remote.query_ltime > 0 {
            self.queries
                .clock
                .witness(LamportTime(remote.query_ltime - 1));
        }
        // One pass over each list, at most MAX_MERGED_NAMES of each: a push-pull is merged
        // on the gossip loop, so its cost must stay linear and bounded.
        let left: HashSet<&str> = remote
            .left_members
            .iter()
            .take(MAX_MERGED_NAMES)
            .map(String::as_str)
            .collect();
        for name in remote.left_members.iter().take(MAX_MERGED_NAMES) {
            let status = remote.status_ltimes.get(name).copied().unwrap_or(0);
            let leave = wire::Leave {
                ltime: status.saturating_add(1),
                node: name.clone(),
                prune: false,
            };
            // Intents learnt by push-pull are not re-gossiped (Go ignores the result).
            let _: IntentOutcome = self.apply_leave_intent(&leave);
        }
        let now = self.now;
        for (name, ltime) in remote.status_ltimes.iter().take(MAX_MERGED_NAMES) {
            if left.contains(name.as_str()) {
                continue;
            }
            self.members
                .handle_join_intent(now, LamportTime(*ltime), name);
        }
        if join && self.ignore_old_events {
            self.user_events
                .ignore_before(LamportTime(remote.event_ltime));
        }
        for slot in remote.events.into_iter().flatten() {
            for entry in slot.events {
                self.apply_user_event(&wire::UserEvent {
                    ltime: slot.ltime,
                    name: entry.name,
                    payload: entry.payload,
                    cc: false,
                });
            }
        }
    }
}
