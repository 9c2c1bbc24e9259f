//! The transmit-limited broadcast queue (ml/queue.go `TransmitLimitedQueue`), public so the
//! Serf layer can keep its own queues (intents, events, queries) with the same semantics.
//!
//! Messages are handed out fewest-transmits first, then largest first, then newest first; each
//! one is retransmitted until `retransmit_limit(mult, n)` sends, then finished. A message with a
//! name replaces a queued one with the same name (memberlist's broadcasts are named by node).

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::config::retransmit_limit;

/// An opaque token given with a broadcast; it comes back from
/// [`BroadcastQueue::take_finished`] once the broadcast is finished (sent its full count,
/// replaced, or pruned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BroadcastToken(pub u64);

type Key = (usize, Reverse<usize>, Reverse<u64>);

#[derive(Debug, Clone)]
struct Item {
    message: Vec<u8>,
    name: Option<String>,
    token: Option<BroadcastToken>,
}

/// A queue of gossip messages with a retransmit limit scaled by cluster size.
#[derive(Debug, Clone)]
pub struct BroadcastQueue {
    retransmit_mult: usize,
    items: BTreeMap<Key, Item>,
    by_name: BTreeMap<String, Key>,
    next_id: u64,
    finished: Vec<BroadcastToken>,
}

impl BroadcastQueue {
    /// An empty queue; each message is sent `retransmit_mult * ceil(log10(n + 1))` times.
    pub fn new(retransmit_mult: usize) -> Self {
        Self {
            retransmit_mult,
            items: BTreeMap::new(),
            by_name: BTreeMap::new(),
            next_id: 0,
            finished: Vec::new(),
        }
    }

    /// Queues `message`. With a `name`, any queued message with the same name is dropped (and
    /// finished). `token`, if given, is reported by [`take_finished`](Self::take_finished).
    pub fn push(&mut self, name: Option<String>, message: Vec<u8>, token: Option<BroadcastToken>) {
        if let Some(name) = &name {
            if let Some(old_key) = self.by_name.remove(name) {
                self.finish(old_key);
            }
        }
        self.next_id += 1;
        let key = (0, Reverse(message.len()), Reverse(self.next_id));
        if let Some(name) = &name {
            self.by_name.insert(name.clone(), key);
        }
        self.items.insert(
            key,
            Item {
                message,
                name,
                token,
            },
        );
    }

    /// Takes as many messages as fit in `limit` bytes, counting `overhead` extra bytes per
    /// message, for a cluster of `n_nodes` members.
    pub fn get_broadcasts(
        &mut self,
        overhead: usize,
        limit: usize,
        n_nodes: usize,
    ) -> Vec<Vec<u8>> {
        let transmit_limit = retransmit_limit(self.retransmit_mult, n_nodes);
        let (Some(min), Some(max)) = (
            self.items.keys().next().map(|key| key.0),
            self.items.keys().next_back().map(|key| key.0),
        ) else {
            return Vec::new();
        };
        let mut used = 0;
        let mut out = Vec::new();
        let mut reinsert = Vec::new();
        let mut transmits = min;
        while transmits <= max {
            let Some(free) = limit.checked_sub(used + overhead).filter(|free| *free > 0) else {
                break;
            };
            let from = (transmits, Reverse(free), Reverse(u64::MAX));
            let to = (transmits + 1, Reverse(usize::MAX), Reverse(u64::MAX));
            let Some(key) = self.items.range(from..to).next().map(|(key, _)| *key) else {
                transmits += 1;
                continue;
            };
            let item = self
                .items
                .remove(&key)
                .expect("key was just found in the map");
            used += overhead + item.message.len();
            out.push(item.message.clone());
            if key.0 + 1 >= transmit_limit {
                if let Some(name) = &item.name {
                    self.by_name.remove(name);
                }
                if let Some(token) = item.token {
                    self.finished.push(token);
                }
            } else {
                reinsert.push(((key.0 + 1, key.1, key.2), item));
            }
        }
        for (key, item) in reinsert {
            if let Some(name) = &item.name {
                self.by_name.insert(name.clone(), key);
            }
            self.items.insert(key, item);
        }
        out
    }

    /// Number of queued messages.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Drops the most-transmitted messages until at most `max_retain` remain.
    pub fn prune(&mut self, max_retain: usize) {
        while self.items.len() > max_retain {
            let key = *self.items.keys().next_back().expect("queue is not empty");
            self.finish(key);
        }
    }

    /// Drops everything (finishing each message).
    pub fn reset(&mut self) {
        self.prune(0);
    }

    /// Tokens of broadcasts finished since the last call.
    pub fn take_finished(&mut self) -> Vec<BroadcastToken> {
        std::mem::take(&mut self.finished)
    }

    fn finish(&mut self, key: Key) {
        if let Some(item) = self.items.remove(&key) {
            if let Some(name) = &item.name {
                if self.by_name.get(name) == Some(&key) {
                    self.by_name.remove(name);
                }
            }
            if let Some(token) = item.token {
                self.finished.push(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn order_is_fewest_transmits_then_largest_then_newest() {
        let mut queue = BroadcastQueue::new(1);
        queue.push(None, message(1, 10), None);
        queue.push(None, message(2, 20), None);
        queue.push(None, message(3, 10), None);
        let out = queue.get_broadcasts(2, 1000, 100);
        let tags: Vec<u8> = out.iter().map(|m| m[0]).collect();
        assert_eq!(tags, [2, 3, 1]);
    }

    #[test]
    fn retransmit_limit_and_finished_tokens() {
        let mut queue = BroadcastQueue::new(2);
        // n = 2 -> limit 2 * ceil(log10(3)) = 2 sends.
        queue.push(Some("a".into()), message(1, 10), Some(BroadcastToken(7)));
        assert_eq!(queue.get_broadcasts(2, 1000, 2).len(), 1);
        assert!(queue.take_finished().is_empty());
        assert_eq!(queue.get_broadcasts(2, 1000, 2).len(), 1);
        assert_eq!(queue.take_finished(), [BroadcastToken(7)]);
        assert!(queue.is_empty());
        assert!(queue.get_broadcasts(2, 1000, 2).is_empty());
    }

    #[test]
    fn named_messages_replace_each_other() {
        let mut queue = BroadcastQueue::new(4);
        queue.push(Some("a".into()), message(1, 10), Some(BroadcastToken(1)));
        queue.push(Some("b".into()), message(2, 10), None);
        queue.push(Some("a".into()), message(3, 10), None);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.take_finished(), [BroadcastToken(1)]);
        let out = queue.get_broadcasts(2, 1000, 10);
        let tags: Vec<u8> = out.iter().map(|m| m[0]).collect();
        assert_eq!(tags, [3, 2]);
        // After a send the name still replaces the re-queued message.
        queue.push(Some("a".into()), message(4, 10), None);
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn limit_is_respected_and_small_messages_fill_the_rest() {
        let mut queue = BroadcastQueue::new(4);
        queue.push(None, message(1, 50), None);
        queue.push(None, message(2, 30), None);
        queue.push(None, message(3, 5), None);
        // 2 + 30 + 2 + 5 = 39 <= 40; the 50-byte message does not fit.
        let out = queue.get_broadcasts(2, 40, 10);
        let tags: Vec<u8> = out.iter().map(|m| m[0]).collect();
        assert_eq!(tags, [2, 3]);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn prune_drops_the_most_sent() {
        let mut queue = BroadcastQueue::new(4);
        queue.push(None, message(1, 10), Some(BroadcastToken(1)));
        queue.get_broadcasts(2, 1000, 10);
        queue.push(None, message(2, 10), None);
        queue.prune(1);
        assert_eq!(queue.take_finished(), [BroadcastToken(1)]);
        assert_eq!(queue.get_broadcasts(2, 1000, 10), [message(2, 10)]);
    }
}
