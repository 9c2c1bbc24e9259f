//! `--config-file` of `agent` and `run`: the part of `serf agent -config-file` that
//! `serf agent` reloads on SIGHUP — `log_level`, `event_handlers` and `tags` — in Go's JSON
//! keys. Files are read in order: `tags` merge (a later file wins), `event_handlers` add up,
//! the last `log_level` counts. Any other key is refused by name: its flag is the way to set it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::cmd::UsageError;

/// What the config files say.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    /// Go's `log_level`.
    #[serde(default)]
    pub(crate) log_level: Option<String>,
    /// Go's `event_handlers`, each `[type[:name][,…]=]command`.
    #[serde(default)]
    pub(crate) event_handlers: Vec<String>,
    /// Go's `tags`.
    #[serde(default)]
    pub(crate) tags: BTreeMap<String, String>,
}

/// Flag of the commands that reload on SIGHUP.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ConfigArgs {
    /// JSON file with `log_level`, `event_handlers` and `tags` as in `serf agent -config-file`
    /// (repeatable), read at start and again on SIGHUP; flags win over it.
    #[arg(long = "config-file", env = "AMB_CONFIG_FILE", value_name = "PATH")]
    pub(crate) config_files: Vec<PathBuf>,
}

impl ConfigArgs {
    /// Reads and merges the files; an error names the file and what is wrong.
    pub(crate) fn read(&self) -> Result<ConfigFile, UsageError> {
        let mut merged = ConfigFile::default();
        for path in &self.config_files {
            let what = format!("--config-file {}", path.display());
            let text = std::fs::read_to_string(path)
                .map_err(|error| UsageError(format!("{what}: {error}")))?;
            let file: ConfigFile = serde_json::from_str(&text)
                .map_err(|error| UsageError(format!("{what}: {error}")))?;
            if let Some(level) = file.log_level {
                let level = crate::parse_log_filter(&level)
                    .map_err(|error| UsageError(format!("{what}: log_level {error}")))?;
                merged.log_level = Some(level);
            }
            merged.event_handlers.extend(file.event_handlers);
            merged.tags.extend(file.tags);
        }
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(files: &[&str]) -> Result<ConfigFile, UsageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = ConfigArgs::default();
        for (index, text) in files.iter().enumerate() {
            let path = dir.path().join(format!("{index}.json"));
            std::fs::write(&path, text).expect("writing a config file");
            args.config_files.push(path);
        }
        args.read()
    }

    #[test]
    fn files_merge_in_order() {
        let config = read(&[
            r#"{"log_level": "debug", "tags": {"a": "1", "b": "1"}, "event_handlers": ["x"]}"#,
            r#"{"log_level": "err", "tags": {"b": "2"}, "event_handlers": ["user=y"]}"#,
        ])
        .expect("valid files");
        assert_eq!(config.log_level.as_deref(), Some("error"));
        assert_eq!(config.event_handlers, ["x", "user=y"]);
        assert_eq!(config.tags["a"], "1");
        assert_eq!(config.tags["b"], "2");
    }

    #[test]
    fn other_keys_and_bad_levels_are_named() {
        let error = read(&[r#"{"node_name": "x"}"#]).expect_err("unknown key");
        assert!(error.0.contains("unknown field `node_name`"), "{error}");
        let error = read(&[r#"{"log_level": "inf"}"#]).expect_err("bad level");
        assert!(
            error.0.contains("log_level \"inf\" is neither a level"),
            "{error}"
        );
    }
}
