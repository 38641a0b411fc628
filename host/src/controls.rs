//! Operator controls that sit over the generation in force without
//! editing its files: paused campaigns, and plugins quarantined for
//! faulting repeatedly.
//!
//! Workers read a [`View`] (one atomic load per batch of events); changes
//! build a new view and swap it in. Both survive a restart: they are kept
//! in the store's metadata.
//!
//! A quarantine names a plugin *version* (its component hash): it holds
//! while generations with that component are active and clears when
//! another version of the plugin is published (a generation built from the
//! folders has it), or when an operator releases it. Activating an older
//! generation (a rollback) does not clear it: the quarantined version
//! would come back unguarded with the next publish.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::event::{format_ts, now_ms};
use crate::generation::Generation;
use crate::metrics::Metrics;
use crate::plugins::{Fault, Plugin};
use crate::rules::{Campaign, TriggerRef};
use crate::store::{Store, StoreError};

const PAUSED_KEY: &str = "controls/paused";
const QUARANTINE_KEY: &str = "controls/quarantine";

/// When a plugin is quarantined: `faults` faults (traps, deadlines,
/// memory, failures to instantiate) of one version within `window`.
/// `faults = 0` never quarantines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuarantinePolicy {
    pub faults: usize,
    pub window: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        QuarantinePolicy {
            faults: 20,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub since: String,
    /// Who asked (from the API request), for the audit trail.
    pub by: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The component hash of the quarantined version.
    pub hash: String,
    pub version: String,
    pub since: String,
    /// Faults within the window when it tripped.
    pub faults: usize,
    /// The last fault, as the worker reported it.
    pub last_fault: String,
}

/// What workers consult: a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Campaign id → when and by whom it was paused.
    pub paused: BTreeMap<String, Paused>,
    /// Plugin name → the quarantined version.
    pub quarantined: BTreeMap<String, Quarantine>,
}

impl View {
    pub fn is_empty(&self) -> bool {
        self.paused.is_empty() && self.quarantined.is_empty()
    }

    /// Whether this version of `plugin` is quarantined.
    pub fn plugin_quarantined(&self, plugin: &Plugin) -> bool {
        self.quarantined
            .get(&plugin.name)
            .is_some_and(|q| q.hash == plugin.hash)
    }

    /// Why campaign `c` must not be decided now, if it must not: paused,
    /// or its trigger, response or channel plugin is quarantined.
    pub fn blocked(&self, gen: &Generation, c: &Campaign) -> Option<&'static str> {
        if self.is_empty() {
            return None;
        }
        if self.paused.contains_key(&c.id) {
            return Some("paused");
        }
        let trigger = match &c.trigger {
            TriggerRef::Plugin { plugin, .. } => Some(plugin.as_str()),
            TriggerRef::Event { .. } => None,
        };
        for name in trigger.into_iter().chain(c.response.as_deref()) {
            if gen.plugin(name).is_some_and(|p| self.plugin_quarantined(p)) {
                return Some("quarantined");
            }
        }
        if gen
            .channel_plugin(&c.channel)
            .is_some_and(|p| self.plugin_quarantined(p))
        {
            return Some("quarantined");
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no campaign {0:?} in the active generation")]
    NoCampaign(String),
    #[error("plugin {0:?} is not quarantined")]
    NotQuarantined(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Recent faults of one plugin version.
struct Recent {
    hash: String,
    at: VecDeque<Instant>,
}

pub struct Controls {
    view: ArcSwap<View>,
    /// Serialises changes (workers only read `view`).
    recent: Mutex<HashMap<String, Recent>>,
    policy: QuarantinePolicy,
    store: Option<Store>,
    metrics: Option<Arc<Metrics>>,
    /// A cluster node: where its own changes go, to reach every node.
    shared: std::sync::OnceLock<Shared>,
}

/// A change of the controls as a cluster shares it: one key per paused
/// campaign (`paused.<id in hex>`) and per quarantined plugin
/// (`quarantined.<name in hex>`), its record as JSON or `None` (gone).
pub type Change = (String, Option<Vec<u8>>);

/// Takes a node's own changes to the cluster.
pub type Shared = Box<dyn Fn(Vec<Change>) + Send + Sync>;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The name a shared key stands for.
pub fn unhex(h: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The changes from `old` to `new`, as shared keys.
fn changes(old: &View, new: &View) -> Vec<Change> {
    fn diff<T: Serialize + PartialEq>(
        tag: &str,
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
        out: &mut Vec<Change>,
    ) {
        for (k, v) in new {
            if old.get(k) != Some(v) {
                out.push((format!("{tag}.{}", hex(k)), serde_json::to_vec(v).ok()));
            }
        }
        for k in old.keys().filter(|k| !new.contains_key(*k)) {
            out.push((format!("{tag}.{}", hex(k)), None));
        }
    }
    let mut out = Vec::new();
    diff("paused", &old.paused, &new.paused, &mut out);
    diff("quarantined", &old.quarantined, &new.quarantined, &mut out);
    out
}

fn decode<T: for<'de> Deserialize<'de> + Default>(bytes: Option<Vec<u8>>, what: &str) -> T {
    match bytes.map(|b| serde_json::from_slice(&b)) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            tracing::error!("stored {what} unreadable, starting without: {e}");
            T::default()
        }
        None => T::default(),
    }
}

impl Controls {
    /// Controls restored from `store` (if any).
    pub fn new(
        policy: QuarantinePolicy,
        store: Option<Store>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Controls, StoreError> {
        let mut view = View::default();
        if let Some(s) = &store {
            view.paused = decode(s.meta(PAUSED_KEY)?, "paused campaigns");
            view.quarantined = decode(s.meta(QUARANTINE_KEY)?, "quarantine");
        }
        let c = Controls {
            view: ArcSwap::from_pointee(view),
            recent: Mutex::new(HashMap::new()),
            policy,
            store,
            metrics,
            shared: std::sync::OnceLock::new(),
        };
        c.publish_metrics();
        Ok(c)
    }

    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Recent>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Swaps in `view`, then stores it (called with the lock held). It
    /// takes effect even if storing fails; then it holds until a restart,
    /// and the error says so.
    fn set(&self, view: View) -> Result<(), StoreError> {
        if let Some(share) = self.shared.get() {
            let diff = changes(&self.view.load(), &view);
            if !diff.is_empty() {
                share(diff);
            }
        }
        self.set_here(view)
    }

    /// Shares this node's own changes through `share` from now on (a
    /// cluster node).
    pub fn share_with(&self, share: Shared) {
        let _ = self.shared.set(share);
    }

    /// The cluster's controls, as shared by every node: they replace this
    /// node's (and are stored here), without being shared back.
    pub fn adopt(
        &self,
        paused: BTreeMap<String, Paused>,
        quarantined: BTreeMap<String, Quarantine>,
    ) {
        let _guard = self.lock();
        let view = View {
            paused,
            quarantined,
        };
        if *self.view.load_full() == view {
            return;
        }
        tracing::info!(
            paused = view.paused.len(),
            quarantined = view.quarantined.len(),
            "controls changed on another node"
        );
        if let Err(e) = self.set_here(view) {
            tracing::error!("controls from the cluster not stored (they hold until restart): {e}");
        }
    }

    fn set_here(&self, view: View) -> Result<(), StoreError> {
        let old = self.view.swap(Arc::new(view));
        self.publish_metrics();
        let Some(s) = &self.store else { return Ok(()) };
        let new = self.view.load();
        if old.paused != new.paused {
            s.put_meta(
                PAUSED_KEY,
                &serde_json::to_vec(&new.paused).unwrap_or_default(),
            )?;
        }
        if old.quarantined != new.quarantined {
            s.put_meta(
                QUARANTINE_KEY,
                &serde_json::to_vec(&new.quarantined).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    fn publish_metrics(&self) {
        if let Some(m) = &self.metrics {
            let v = self.view.load();
            m.set_controls(v.paused.len(), v.quarantined.keys().map(String::as_str));
        }
    }

    /// Pauses campaign `id` of the active generation. Pausing twice is not
    /// an error; the first pause's record stays.
    pub fn pause(&self, gen: &Generation, id: &str, by: &str) -> Result<View, ControlError> {
        if !gen.rules.campaigns.iter().any(|c| c.id == id) {
            return Err(ControlError::NoCampaign(id.to_owned()));
        }
        let _guard = self.lock();
        let mut view = (*self.view.load_full()).clone();
        if !view.paused.contains_key(id) {
            view.paused.insert(
                id.to_owned(),
                Paused {
                    since: format_ts(now_ms()),
                    by: by.to_owned(),
                },
            );
            tracing::info!(campaign = id, by, "campaign paused");
            self.set(view.clone())?;
        }
        Ok(view)
    }

    /// Resumes campaign `id` (also one no longer in the generation, so a
    /// stale pause can be cleared).
    pub fn resume(&self, gen: &Generation, id: &str, by: &str) -> Result<View, ControlError> {
        let _guard = self.lock();
        let mut view = (*self.view.load_full()).clone();
        if view.paused.remove(id).is_none() && !gen.rules.campaigns.iter().any(|c| c.id == id) {
            return Err(ControlError::NoCampaign(id.to_owned()));
        }
        tracing::info!(campaign = id, by, "campaign resumed");
        self.set(view.clone())?;
        Ok(view)
    }

    /// Releases a quarantined plugin by hand.
    pub fn release(&self, plugin: &str, by: &str) -> Result<View, ControlError> {
        let mut recent = self.lock();
        let mut view = (*self.view.load_full()).clone();
        if view.quarantined.remove(plugin).is_none() {
            return Err(ControlError::NotQuarantined(plugin.to_owned()));
        }
        recent.remove(plugin);
        tracing::warn!(plugin, by, "plugin released from quarantine by an operator");
        self.set(view.clone())?;
        Ok(view)
    }

    /// Counts one fault of `plugin`; quarantines the version when the
    /// policy's count is reached within its window. Returns whether this
    /// fault tripped it. An error the plugin returned is its answer to that
    /// input (malformed events can cause them), not a broken plugin: it
    /// does not count.
    pub fn fault(&self, plugin: &Plugin, fault: &Fault, what: &str) -> bool {
        if self.policy.faults == 0 || matches!(fault, Fault::Returned(_)) {
            return false;
        }
        let mut recent = self.lock();
        let now = Instant::now();
        let r = recent.entry(plugin.name.clone()).or_insert_with(|| Recent {
            hash: plugin.hash.clone(),
            at: VecDeque::new(),
        });
        if r.hash != plugin.hash {
            // Another version: its faults count afresh.
            r.hash = plugin.hash.clone();
            r.at.clear();
        }
        r.at.push_back(now);
        while r
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            r.at.pop_front();
        }
        let faults = r.at.len();
        if faults < self.policy.faults || self.view.load().plugin_quarantined(plugin) {
            return false;
        }
        r.at.clear();
        let mut view = (*self.view.load_full()).clone();
        view.quarantined.insert(
            plugin.name.clone(),
            Quarantine {
                hash: plugin.hash.clone(),
                version: plugin.version.clone(),
                since: format_ts(now_ms()),
                faults,
                last_fault: what.to_owned(),
            },
        );
        tracing::error!(
            plugin = %plugin.name,
            version = %plugin.version,
            faults,
            window_s = self.policy.window.as_secs_f64(),
            "plugin quarantined with its campaigns until another version is published"
        );
        if let Err(e) = self.set(view) {
            tracing::error!("quarantine not stored (it holds until restart): {e}");
        }
        true
    }

    /// A generation was activated: quarantines of plugins it carries in
    /// another version clear (the fix was published). A plugin absent from
    /// it keeps its quarantine, for a rollback to a generation that has it.
    pub fn on_generation(&self, gen: &Generation) {
        let mut recent = self.lock();
        let view = self.view.load_full();
        let cleared: Vec<&String> = view
            .quarantined
            .iter()
            .filter(|(name, q)| gen.plugin(name).is_some_and(|p| p.hash != q.hash))
            .map(|(name, _)| name)
            .collect();
        if cleared.is_empty() {
            return;
        }
        let mut next = (*view).clone();
        for name in cleared {
            let version = gen.plugin(name).map(|p| p.version.as_str()).unwrap_or("");
            tracing::info!(plugin = %name, version, generation = gen.number, "quarantine cleared: another version is active");
            next.quarantined.remove(name);
            recent.remove(name);
        }
        if let Err(e) = self.set(next) {
            tracing::error!("quarantine release not stored: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::{Limits, Runtime};

    fn trap() -> Fault {
        Fault::Trap("unreachable".into())
    }

    fn plugin(rt: &Runtime, name: &str) -> Plugin {
        let (_, bytes, _) = crate::embedded::EMBEDDED
            .iter()
            .find(|(n, _, _)| *n == name)
            .expect("embedded plugin");
        rt.load(name, bytes).expect("loads")
    }

    #[test]
    fn trips_at_n_faults_in_window_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(Limits::default(), None).unwrap();
        let p = plugin(&rt, "first-identify");
        let policy = QuarantinePolicy {
            faults: 3,
            window: Duration::from_secs(60),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let c = Controls::new(policy, Some(store), None).unwrap();
            assert!(!c.fault(&p, &trap(), "trap"));
            assert!(!c.fault(&p, &trap(), "trap"));
            assert!(!c.view().plugin_quarantined(&p));
            assert!(c.fault(&p, &trap(), "trap"), "the third fault trips it");
            assert!(c.view().plugin_quarantined(&p));
            assert!(!c.fault(&p, &trap(), "trap"), "already quarantined");
        }
        let store = Store::open(dir.path()).unwrap();
        let c = Controls::new(policy, Some(store), None).unwrap();
        assert!(c.view().plugin_quarantined(&p), "kept across a restart");
        c.release(&p.name, "ops").unwrap();
        assert!(!c.view().plugin_quarantined(&p));
        assert!(matches!(
            c.release(&p.name, "ops"),
            Err(ControlError::NotQuarantined(_))
        ));
    }

    #[test]
    fn faults_outside_the_window_do_not_count() {
        let rt = Runtime::new(Limits::default(), None).unwrap();
        let p = plugin(&rt, "first-identify");
        let c = Controls::new(
            QuarantinePolicy {
                faults: 2,
                window: Duration::from_millis(30),
            },
            None,
            None,
        )
        .unwrap();
        for _ in 0..5 {
            let refused = Fault::Returned("bad input".into());
            assert!(
                !c.fault(&p, &refused, "x"),
                "an error returned does not count"
            );
        }
        assert!(!c.fault(&p, &trap(), "x"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !c.fault(&p, &trap(), "x"),
            "the first fault fell out of the window"
        );
        assert!(c.fault(&p, &trap(), "x"));
        let never = Controls::new(
            QuarantinePolicy {
                faults: 0,
                window: Duration::from_secs(1),
            },
            None,
            None,
        )
        .unwrap();
        for _ in 0..10 {
            assert!(!never.fault(&p, &trap(), "x"));
        }
    }
}
