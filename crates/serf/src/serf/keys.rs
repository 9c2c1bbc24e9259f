//! The asking side of key rotation (serf/keymanager.go): a key query goes to every member,
//! answers are counted against the number of live members, and the outcome reads as Go's
//! `KeyResponse` ("%d/%d nodes reported success" when some stayed silent).

use std::collections::BTreeMap;

use crate::wire::serf::KeyResponse;

/// A key operation across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOperation {
    /// Add a key to every keyring (`_serf_install-key`).
    Install(Vec<u8>),
    /// Make an installed key the primary everywhere (`_serf_use-key`).
    Use(Vec<u8>),
    /// Remove a non-primary key everywhere (`_serf_remove-key`).
    Remove(Vec<u8>),
    /// Ask every member for its keys (`_serf_list-keys`).
    List,
}

impl KeyOperation {
    /// The internal query name.
    pub fn query_name(&self) -> &'static str {
        match self {
            Self::Install(_) => "_serf_install-key",
            Self::Use(_) => "_serf_use-key",
            Self::Remove(_) => "_serf_remove-key",
            Self::List => "_serf_list-keys",
        }
    }

    /// The query payload (`07` + `{Key}`; an empty key for list).
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Self::Install(key) | Self::Use(key) | Self::Remove(key) => {
                crate::wire::serf::encode_key_request(key)
            }
            Self::List => crate::wire::serf::encode_key_request(&[]),
        }
    }
}

/// The outcome of a key operation (Go's `serf.KeyResponse` plus its error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Node name → its message (errors, and warnings such as a truncated key list).
    pub messages: BTreeMap<String, String>,
    /// Live members when the query went out.
    pub num_nodes: usize,
    /// Members that answered.
    pub num_resp: usize,
    /// Members that answered with a failure (or an unreadable answer).
    pub num_err: usize,
    /// Base64 key → how many members hold it (list only).
    pub keys: BTreeMap<String, usize>,
    /// Base64 primary key → how many members use it (list only).
    pub primary_keys: BTreeMap<String, usize>,
}

impl KeyReport {
    /// Counts one member's answer (Go's `streamKeyResp`).
    pub fn count(&mut self, from: &str, payload: &[u8]) {
        self.num_resp += 1;
        let response = match KeyResponse::decode(payload) {
            Ok(response) => response,
            Err(error) => {
                self.messages.insert(
                    from.to_owned(),
                    format!("Invalid key query response: {error}"),
                );
                self.num_err += 1;
                return;
            }
        };
        if !response.result {
            self.num_err += 1;
        }
        if !response.result || !response.message.is_empty() {
            self.messages.insert(from.to_owned(), response.message);
        }
        for key in response.keys.unwrap_or_default() {
            *self.keys.entry(key).or_default() += 1;
        }
        if response.result {
            *self.primary_keys.entry(response.primary_key).or_default() += 1;
        }
    }

    /// Every live member has answered.
    pub fn complete(&self) -> bool {
        self.num_resp >= self.num_nodes
    }

    /// Go's verdict: failures first, then missing answers; `None` when all succeeded.
    pub fn error(&self) -> Option<String> {
        if self.num_err != 0 {
            return Some(format!(
                "{}/{} nodes reported failure",
                self.num_err, self.num_nodes
            ));
        }
        if self.num_resp != self.num_nodes {
            return Some(format!(
                "{}/{} nodes reported success",
                self.num_resp, self.num_nodes
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(result: bool, message: &str, keys: Option<&[&str]>, primary: &str) -> Vec<u8> {
        KeyResponse {
            result,
            message: message.to_owned(),
            keys: keys.map(|keys| keys.iter().map(|key| (*key).to_owned()).collect()),
            primary_key: primary.to_owned(),
        }
        .encode()
    }

    /// Answers (from, payload), live members, expected verdict.
    type Case<'a> = (&'a [(&'a str, Vec<u8>)], usize, Option<&'a str>);

    #[test]
    fn counts_answers_as_go_does() {
        let cases: &[Case<'_>] = &[
            (
                &[
                    ("a", answer(true, "", None, "")),
                    ("b", answer(true, "", None, "")),
                ],
                2,
                None,
            ),
            (
                &[("a", answer(true, "", None, ""))],
                2,
                Some("1/2 nodes reported success"),
            ),
            (
                &[(
                    "a",
                    answer(false, "Removing the primary key is not allowed", None, ""),
                )],
                2,
                Some("1/2 nodes reported failure"),
            ),
            (
                &[("a", vec![0x01, 0x02])],
                1,
                Some("1/1 nodes reported failure"),
            ),
        ];
        for (answers, num_nodes, error) in cases {
            let mut report = KeyReport {
                num_nodes: *num_nodes,
                ..KeyReport::default()
            };
            for (from, payload) in answers.iter() {
                report.count(from, payload);
            }
            assert_eq!(report.error().as_deref(), *error, "{answers:?}");
        }
    }

    #[test]
    fn list_counts_keys_and_primaries() {
        let mut report = KeyReport {
            num_nodes: 2,
            ..KeyReport::default()
        };
        report.count("a", &answer(true, "", Some(&["k1", "k2"]), "k1"));
        report.count("b", &answer(true, "truncated", Some(&["k1"]), "k1"));
        assert!(report.complete());
        assert_eq!(report.error(), None);
        assert_eq!(report.keys, [("k1".into(), 2), ("k2".into(), 1)].into());
        assert_eq!(report.primary_keys, [("k1".into(), 2)].into());
        assert_eq!(report.messages, [("b".into(), "truncated".into())].into());
    }
}
