//! A compiled, validated plugin: what it is, what it may do, and the
//! pre-linked instance it is instantiated from.

use super::runtime::hex_sha256;
use super::v0_1_0;
use super::HostState;
use crate::manifest::Manifest;

/// What a trigger plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerInfo {
    pub subscribes: Vec<String>,
    pub firings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginKind {
    Trigger(TriggerInfo),
    Response,
    Channel,
}

impl PluginKind {
    pub fn name(&self) -> &'static str {
        match self {
            PluginKind::Trigger(_) => "trigger",
            PluginKind::Response => "response",
            PluginKind::Channel => "channel",
        }
    }
}

#[derive(Clone)]
pub(super) enum Pre {
    Trigger(v0_1_0::trigger::TriggerPre<HostState>),
    Response(v0_1_0::response::ResponsePre<HostState>),
    Channel(v0_1_0::channel::ChannelPre<HostState>),
}

/// A compiled, validated plugin, ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub kind: PluginKind,
    pub contract: &'static str,
    /// SHA-256 of the component bytes, hex.
    pub hash: String,
    /// Where it was loaded from (a file, or `embedded:NAME`).
    pub source: String,
    /// What the plugin may ask the host to do, as granted. Set with
    /// [`Plugin::set_manifest`]: its config is part of the instance key.
    pub(super) manifest: Manifest,
    /// Instances are cached by this: the component's hash and the config
    /// it is instantiated with (its environment), so a changed manifest
    /// `[config]` for the same component gets fresh instances.
    pub(super) key: String,
    pub(super) pre: Pre,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl Plugin {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Replaces the manifest (and with it the instance key).
    pub fn set_manifest(&mut self, manifest: Manifest) {
        let mut config = String::new();
        for (k, v) in &manifest.config {
            config.push_str(&format!("{}={}\n", k.len(), k));
            config.push_str(&format!("{}={}\n", v.len(), v));
        }
        self.key = format!("{}-{}", self.hash, &hex_sha256(config.as_bytes())[..16]);
        self.manifest = manifest;
    }

    /// What worker instances of this plugin are cached by.
    pub fn instance_key(&self) -> &str {
        &self.key
    }

    pub fn trigger_info(&self) -> Option<&TriggerInfo> {
        match &self.kind {
            PluginKind::Trigger(t) => Some(t),
            _ => None,
        }
    }
}
