//! A plugin's manifest: what it asks the host to do for it. A plugin gets
//! no capability it does not name here, and an operator's config
//! ([`crate::config::PluginGrant`]) can narrow or redirect what is named.
//!
//! Written next to the component: `NAME.toml` beside `NAME.wasm` in a
//! plugins folder, `nudge-plugin.toml` in an SDK crate (embedded with the
//! example plugins).
//!
//! ```toml
//! [capabilities]
//! email = true                  # the host may send its rendered email
//! agent_queue = true            # it may queue actions for the contact centre
//! http = ["hooks.example.com"]  # hosts (or host:port) it may send HTTP to
//!
//! [config]                      # read by the plugin with `nudge_sdk::config`
//! url = "https://hooks.example.com/nudge"
//!
//! [limits]                      # less than the operator's [limits], never more
//! memory_mib = 16
//! deadline = "20ms"
//! state_quota_kib = 64
//! max_log_kib = 8
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::PluginGrant;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub email: bool,
    #[serde(default)]
    pub agent_queue: bool,
    /// Allowed HTTP destinations: `host` (any port) or `host:port`.
    #[serde(default)]
    pub http: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Settings the plugin reads (as its environment: the only environment
    /// it has).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Tighter limits the plugin asks for: each lowers the operator's
    /// value of `[limits]` in `nudge.toml`, none can raise it.
    #[serde(default)]
    pub limits: ManifestLimits,
}

/// A plugin's own `[limits]`: every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLimits {
    pub memory_mib: Option<usize>,
    /// A duration such as `"50ms"`; held in milliseconds once parsed.
    #[serde(default, deserialize_with = "duration_ms")]
    pub deadline: Option<u64>,
    pub max_state_value_kib: Option<usize>,
    pub max_state_write_kib: Option<usize>,
    pub state_quota_kib: Option<usize>,
    pub max_output_kib: Option<usize>,
    pub max_log_kib: Option<usize>,
    pub max_ops_per_call: Option<usize>,
}

fn duration_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    crate::rules::parse_duration(&text)
        .ok()
        .filter(|&ms| ms > 0)
        .map(|ms| Some(ms as u64))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "deadline {text:?}: a positive duration such as \"50ms\" or \"1s\""
            ))
        })
}

impl Manifest {
    pub fn parse(source: &str, text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(":{}", crate::rules::line_of(text, s.start)))
                .unwrap_or_default();
            format!("{source}{line}: {}", e.message())
        })
    }

    /// Where the manifest of the component `wasm` in a plugins folder is:
    /// `NAME.toml` beside `NAME.wasm`.
    pub fn path_beside(wasm: &Path) -> std::path::PathBuf {
        wasm.with_extension("toml")
    }

    /// The manifest beside `wasm` (`NAME.toml`), or none (no capabilities).
    pub fn beside(wasm: &Path) -> Result<Manifest, String> {
        let path = Manifest::path_beside(wasm);
        match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&path.display().to_string(), &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Applies the operator's grant.
    pub fn granted(mut self, grant: Option<&PluginGrant>) -> Manifest {
        if let Some(g) = grant {
            if let Some(http) = &g.http {
                self.capabilities.http = http.clone();
            }
            for (k, v) in &g.config {
                self.config.insert(k.clone(), v.clone());
            }
        }
        self
    }

    /// Whether an HTTP request to `host` on `port` is allowed.
    pub fn allows_http(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.capabilities.http.iter().any(|a| {
            match a.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()) {
                Some((h, p)) => h.eq_ignore_ascii_case(host) && p.parse() == Ok(port),
                None => a.eq_ignore_ascii_case(host),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matches_host_and_optional_port() {
        let m = Manifest::parse(
            "m.toml",
            "[capabilities]\nhttp = [\"hooks.example.com\", \"127.0.0.1:9000\"]\n",
        )
        .unwrap();
        assert!(m.allows_http("hooks.example.com", 443));
        assert!(m.allows_http("HOOKS.example.com", 80));
        assert!(m.allows_http("127.0.0.1", 9000));
        assert!(!m.allows_http("127.0.0.1", 9001));
        assert!(!m.allows_http("evil.example.com", 443));
        assert!(!m.allows_http("example.com", 443));
    }

    #[test]
    fn grant_replaces_allowlist_and_merges_config() {
        let m = Manifest::parse(
            "m.toml",
            "[capabilities]\nhttp = [\"a\"]\n[config]\nurl = \"x\"\nkeep = \"k\"\n",
        )
        .unwrap();
        let g = PluginGrant {
            http: Some(vec!["b".into()]),
            config: [("url".to_string(), "y".to_string())].into(),
        };
        let m = m.granted(Some(&g));
        assert_eq!(m.capabilities.http, ["b"]);
        assert_eq!(m.config["url"], "y");
        assert_eq!(m.config["keep"], "k");
    }

    #[test]
    fn unknown_capability_is_an_error_with_line() {
        let e = Manifest::parse("m.toml", "[capabilities]\nsockets = true\n").unwrap_err();
        assert!(e.starts_with("m.toml:2:"), "{e}");
    }
}
