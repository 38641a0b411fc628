//! A generation: one immutable, validated set of plugins, campaigns and
//! policies, with the routing tables built from them. Workers take the
//! current generation per event; a reload builds the next one beside it and
//! swaps it in atomically ([`Current`]), so an event never sees half of one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::plugins::{Plugin, PluginKind};
use crate::rules::{Campaign, RuleError, RuleSet, RulesError, TriggerRef};

/// The routing key of identify events.
pub const IDENTIFY: &str = "identify";

pub struct Generation {
    pub number: u64,
    pub plugins: Vec<Plugin>,
    pub rules: RuleSet,
    by_name: HashMap<String, usize>,
    /// Event name (or [`IDENTIFY`]) → trigger plugins subscribed to it.
    subscribers: HashMap<String, Vec<usize>>,
    /// Per plugin: firing name → campaigns listening for it.
    on_firing: Vec<HashMap<String, Vec<usize>>>,
    /// Event name → campaigns triggered by the event itself.
    on_event: HashMap<String, Vec<usize>>,
    goals: BTreeSet<String>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("number", &self.number)
            .field("plugins", &self.plugins.len())
            .field("campaigns", &self.rules.campaigns.len())
            .finish()
    }
}

fn error(c: &Campaign, line: Option<usize>, field: &str, message: String) -> RuleError {
    RuleError {
        file: c.file.clone(),
        line,
        field: Some(field.into()),
        message,
    }
}

impl Generation {
    /// Checks that every campaign refers to plugins and firings that exist
    /// and builds the routing tables.
    pub fn build(
        number: u64,
        plugins: Vec<Plugin>,
        rules: RuleSet,
    ) -> Result<Generation, RulesError> {
        let mut errors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, p) in plugins.iter().enumerate() {
            if let Some(j) = by_name.insert(p.name.clone(), i) {
                errors.push(RuleError {
                    file: p.source.clone().into(),
                    line: None,
                    field: None,
                    message: format!(
                        "plugin name {:?} is also used by {}",
                        p.name, plugins[j].source
                    ),
                });
            }
        }
        let mut subscribers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in plugins.iter().enumerate() {
            if let Some(info) = p.trigger_info() {
                for s in &info.subscribes {
                    subscribers.entry(s.clone()).or_default().push(i);
                }
            }
        }
        let names = |kind: fn(&PluginKind) -> bool| {
            plugins
                .iter()
                .filter(|p| kind(&p.kind))
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut on_firing: Vec<HashMap<String, Vec<usize>>> = vec![HashMap::new(); plugins.len()];
        let mut on_event: HashMap<String, Vec<usize>> = HashMap::new();
        for (ci, c) in rules.campaigns.iter().enumerate() {
            match &c.trigger {
                TriggerRef::Plugin { plugin, firing } => match by_name.get(plugin) {
                    Some(&pi) => match plugins[pi].trigger_info() {
                        Some(info) if info.firings.contains(firing) => {
                            on_firing[pi].entry(firing.clone()).or_default().push(ci);
                        }
                        Some(info) => errors.push(error(
                            c,
                            Some(c.trigger_line),
                            "trigger.firing",
                            format!(
                                "plugin {plugin:?} has no firing {firing:?} (it fires: {})",
                                info.firings.join(", ")
                            ),
                        )),
                        None => errors.push(error(
                            c,
                            Some(c.trigger_line),
                            "trigger.plugin",
                            format!("plugin {plugin:?} is not a trigger plugin"),
                        )),
                    },
                    None => errors.push(error(
                        c,
                        Some(c.trigger_line),
                        "trigger.plugin",
                        format!(
                            "no plugin named {plugin:?} (trigger plugins: {})",
                            names(|k| matches!(k, PluginKind::Trigger(_)))
                        ),
                    )),
                },
                TriggerRef::Event { name } => on_event.entry(name.clone()).or_default().push(ci),
            }
            if let Some(r) = &c.response {
                match by_name.get(r).map(|&i| &plugins[i].kind) {
                    Some(PluginKind::Response) => {}
                    Some(_) => errors.push(error(
                        c,
                        c.response_line,
                        "response",
                        format!("plugin {r:?} is not a response plugin"),
                    )),
                    None => errors.push(error(
                        c,
                        c.response_line,
                        "response",
                        format!(
                            "no plugin named {r:?} (response plugins: {})",
                            names(|k| matches!(k, PluginKind::Response))
                        ),
                    )),
                }
            }
        }
        for (channel, policy) in &rules.policies.channels {
            let Some(name) = &policy.plugin else { continue };
            let problem = match by_name.get(name).map(|&i| &plugins[i].kind) {
                Some(PluginKind::Channel) => continue,
                Some(_) => format!("plugin {name:?} is not a channel plugin"),
                None => format!(
                    "no plugin named {name:?} (channel plugins: {})",
                    names(|k| matches!(k, PluginKind::Channel))
                ),
            };
            errors.push(RuleError {
                file: rules.dir.join(crate::rules::POLICIES_FILE),
                line: None,
                field: Some(format!("channels.{channel}.plugin")),
                message: problem,
            });
        }
        if !errors.is_empty() {
            return Err(RulesError(errors));
        }
        let goals = rules.goal_events();
        Ok(Generation {
            number,
            plugins,
            rules,
            by_name,
            subscribers,
            on_firing,
            on_event,
            goals,
        })
    }

    pub fn plugin(&self, name: &str) -> Option<&Plugin> {
        self.by_name.get(name).map(|&i| &self.plugins[i])
    }

    /// The index of plugin `name` (for [`Generation::campaigns_for_firing`]).
    pub fn plugin_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Indices of trigger plugins subscribed to `key` (event name or
    /// [`IDENTIFY`]).
    pub fn subscribers(&self, key: &str) -> &[usize] {
        self.subscribers.get(key).map_or(&[], Vec::as_slice)
    }

    /// Campaigns listening for `firing` of plugin `plugin` (an index).
    pub fn campaigns_for_firing(&self, plugin: usize, firing: &str) -> &[usize] {
        self.on_firing
            .get(plugin)
            .and_then(|m| m.get(firing))
            .map_or(&[], Vec::as_slice)
    }

    /// Campaigns triggered directly by event `key`.
    pub fn campaigns_for_event(&self, key: &str) -> &[usize] {
        self.on_event.get(key).map_or(&[], Vec::as_slice)
    }

    /// The channel plugin that delivers on `channel`, if one is set.
    pub fn channel_plugin(&self, channel: &str) -> Option<&Plugin> {
        let name = self.rules.policies.channels.get(channel)?.plugin.as_ref()?;
        self.plugin(name)
    }

    pub fn is_goal(&self, event: &str) -> bool {
        self.goals.contains(event)
    }

    pub fn campaign(&self, i: usize) -> &Campaign {
        &self.rules.campaigns[i]
    }
}

/// The generation in force, swapped atomically.
pub struct Current(ArcSwap<Generation>);

impl Current {
    pub fn new(g: Generation) -> Current {
        Current(ArcSwap::from_pointee(g))
    }

    /// The generation to use for one event, start to end.
    pub fn load(&self) -> Arc<Generation> {
        self.0.load_full()
    }

    /// Makes `g` the generation of every event that starts from now on.
    pub fn store(&self, g: Arc<Generation>) {
        self.0.store(g);
    }
}
