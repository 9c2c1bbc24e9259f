//! Member filters (anchored regexes, as `members-filtered` and `serf members -tag` use them) and
//! event-stream filters (`member-join,user:deploy,*`). Pure functions, shared by the server and
//! the command-line tools.

use std::collections::BTreeMap;

use regex::Regex;

use super::backend::Event;
use super::messages::MemberRow;

/// A filter value that is not a valid regular expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to compile regex: {field}={pattern:?}: {reason}")]
pub struct FilterError {
    /// Which filter (`name`, `status` or `tag <key>`).
    pub field: String,
    /// The pattern given.
    pub pattern: String,
    /// Why it does not compile.
    pub reason: String,
}

/// Compiled `members-filtered` filters; every regex is anchored (`^…$`), an empty one matches
/// anything.
#[derive(Debug, Clone)]
pub struct MemberFilter {
    tags: Vec<(String, Regex)>,
    status: Option<Regex>,
    name: Option<Regex>,
}

fn anchored(field: &str, pattern: &str) -> Result<Regex, FilterError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|error| FilterError {
        field: field.to_owned(),
        pattern: pattern.to_owned(),
        reason: regex_reason(&error),
    })
}

/// The one-line cause of a regex error (its display spans several lines with a caret).
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(|line| line.trim().trim_start_matches("error: ").to_owned())
        .unwrap_or(text)
}

impl MemberFilter {
    /// Compiles the filters. Tag regexes apply even when empty (a missing tag reads as "").
    pub fn new(
        tags: &BTreeMap<String, String>,
        status: &str,
        name: &str,
    ) -> Result<Self, FilterError> {
        let tags = tags
            .iter()
            .map(|(key, pattern)| Ok((key.clone(), anchored(&format!("tag {key}"), pattern)?)))
            .collect::<Result<Vec<_>, FilterError>>()?;
        let status = if status.is_empty() {
            None
        } else {
            Some(anchored("status", status)?)
        };
        let name = if name.is_empty() {
            None
        } else {
            Some(anchored("name", name)?)
        };
        Ok(Self { tags, status, name })
    }

    /// Whether `member` passes every filter.
    pub fn matches(&self, member: &MemberRow) -> bool {
        self.tags.iter().all(|(key, regex)| {
            regex.is_match(member.tags.get(key).map(String::as_str).unwrap_or(""))
        }) && self
            .status
            .as_ref()
            .is_none_or(|regex| regex.is_match(&member.status))
            && self
                .name
                .as_ref()
                .is_none_or(|regex| regex.is_match(&member.name))
    }
}

/// One element of a `stream` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    event: String,
    name: String,
}

/// Parses a `stream` filter (`""` = `*`); `None` if any element is not a known event type
/// (the server then answers "Invalid event filter").
pub fn parse_event_filter(spec: &str) -> Option<Vec<EventFilter>> {
    let spec = if spec.is_empty() { "*" } else { spec };
    spec.split(',')
        .map(|element| {
            let (event, name) = if let Some(name) = element.strip_prefix("user:") {
                ("user", name)
            } else if let Some(name) = element.strip_prefix("query:") {
                ("query", name)
            } else {
                (element, "")
            };
            match event {
                "member-join" | "member-leave" | "member-failed" | "member-update"
                | "member-reap" | "user" | "query" | "*" => Some(EventFilter {
                    event: event.to_owned(),
                    name: name.to_owned(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// Whether any filter accepts `event`.
pub fn event_matches(filters: &[EventFilter], event: &Event) -> bool {
    filters.iter().any(|filter| {
        if filter.event == "*" {
            return true;
        }
        if filter.event != event.type_name() {
            return false;
        }
        match event {
            Event::User { name, .. } | Event::Query { name, .. } => {
                filter.name.is_empty() || filter.name == *name
            }
            Event::Member { .. } => true,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::backend::MemberEventKind;

    fn member(name: &str, status: &str, tags: &[(&str, &str)]) -> MemberRow {
        MemberRow {
            name: name.into(),
            status: status.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..MemberRow::default()
        }
    }

    #[test]
    fn member_filters_are_anchored() {
        let web = member("web-1", "alive", &[("role", "web"), ("dc", "x")]);
        let check = |tags: &[(&str, &str)], status: &str, name: &str, expected: bool| {
            let tags = tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let filter = MemberFilter::new(&tags, status, name).unwrap();
            assert_eq!(
                filter.matches(&web),
                expected,
                "{tags:?} {status:?} {name:?}"
            );
        };
        check(&[], "", "", true);
        check(&[("role", "web")], "", "", true);
        check(&[("role", "we")], "", "", false);
        check(&[("role", "w.*")], "alive", "web-.", true);
        check(&[("role", "web|db")], "", "", true);
        check(&[("missing", "")], "", "", true);
        check(&[("missing", ".+")], "", "", false);
        check(&[], "failed", "", false);
        check(&[], "", "web", false);
    }

    #[test]
    fn bad_regex_names_the_filter() {
        let error = MemberFilter::new(&BTreeMap::new(), "", "(").unwrap_err();
        assert_eq!(error.field, "name");
        assert!(error
            .to_string()
            .starts_with("Failed to compile regex: name=\"(\""));
    }

    #[test]
    fn event_filters() {
        let join = Event::Member {
            kind: MemberEventKind::Join,
            members: vec![],
        };
        let deploy = Event::User {
            ltime: 1,
            name: "deploy".into(),
            payload: vec![],
            coalesce: false,
        };
        let check = |spec: &str, event: &Event, expected: bool| {
            let filters = parse_event_filter(spec).unwrap();
            assert_eq!(event_matches(&filters, event), expected, "{spec}");
        };
        check("", &join, true);
        check("*", &deploy, true);
        check("member-join", &join, true);
        check("member-leave", &join, false);
        check("user", &deploy, true);
        check("user:deploy", &deploy, true);
        check("user:other", &deploy, false);
        check("member-leave,user:deploy", &deploy, true);
        for bad in ["bogus", "member-join,", "users"] {
            assert_eq!(parse_event_filter(bad), None, "{bad}");
        }
    }
}
