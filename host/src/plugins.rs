//! The WASM plugin runtime. The only module that imports wasmtime.
//!
//! - Plugins are components built against `nudge:plugin@0.1.0`
//!   (`sdk/wit/since_v0.1.0`). Bindings per contract version live in
//!   [`v0_1_0`]; a later contract gets its own module converting into the
//!   host's types, so old plugins keep loading beside new ones.
//! - Compiled once: artifacts are cached on disk, keyed by the SHA-256 of the
//!   component and the engine's compatibility hash.
//! - Sandboxed: WASI with no preopened directories, no network, frozen
//!   clocks, and no environment but the `[config]` of the plugin's manifest (time comes only from the `clock` import); a
//!   memory cap per instance and a deadline per call (epoch interruption).
//! - Contained: a trap, a deadline or a memory bomb ends that call only; the
//!   poisoned instance is dropped and the next call gets a fresh one from the
//!   `InstancePre`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store as WasmStore, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::event::{Event, Kind};
use crate::manifest::Manifest;
use crate::store::Store;

/// Bindings of contract 0.1.0, one module per world, sharing the types.
pub mod v0_1_0 {
    pub mod trigger {
        wasmtime::component::bindgen!({
            world: "trigger",
            path: "../sdk/wit/since_v0.1.0",
            imports: { "nudge:plugin/state": trappable, "nudge:plugin/timers": trappable, "nudge:plugin/log": trappable },
        });
    }
    pub mod response {
        wasmtime::component::bindgen!({
            world: "response",
            path: "../sdk/wit/since_v0.1.0",
            with: {
                "nudge:plugin/types": super::trigger::nudge::plugin::types,
                "nudge:plugin/clock": super::trigger::nudge::plugin::clock,
                "nudge:plugin/log": super::trigger::nudge::plugin::log,
            },
        });
    }
    pub mod channel {
        wasmtime::component::bindgen!({
            world: "channel",
            path: "../sdk/wit/since_v0.1.0",
            with: {
                "nudge:plugin/types": super::trigger::nudge::plugin::types,
                "nudge:plugin/clock": super::trigger::nudge::plugin::clock,
                "nudge:plugin/log": super::trigger::nudge::plugin::log,
            },
        });
    }
    pub use trigger::nudge::plugin::types;
}

use v0_1_0::types as wit;

/// The contract versions this host loads.
pub const SUPPORTED_CONTRACTS: &[&str] = &["0.1.0"];

/// Limits every plugin call runs under.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory cap per instance.
    pub memory_bytes: usize,
    /// Wall-clock deadline per call.
    pub deadline: Duration,
    /// Largest state value a plugin may store.
    pub max_state_value: usize,
    /// Most state writes, timer changes and log lines per call.
    pub max_ops_per_call: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(200),
            max_state_value: 1 << 20,
            max_ops_per_call: 1000,
        }
    }
}

/// Why loading a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{source_name}: not a loadable component: {message}")]
    Compile {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: does not fit contract nudge:plugin@0.1.0 as a trigger, response or channel: {message}")]
    Contract {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

/// A firing as the host keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    pub name: String,
    pub data: Map<String, Value>,
}

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
enum Pre {
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
    manifest: Manifest,
    /// Instances are cached by this: the component's hash and the config
    /// it is instantiated with (its environment), so a changed manifest
    /// `[config]` for the same component gets fresh instances.
    key: String,
    pre: Pre,
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

/// One pending timer change collected during a call.
pub type TimerOps = Vec<(String, Option<i64>)>;

/// The context of the call in progress: whose data, what time, and the
/// changes the plugin asked for (applied only if the call succeeds).
#[derive(Default)]
pub struct Call {
    pub plugin: String,
    pub customer: String,
    pub now: i64,
    store: Option<Store>,
    /// State writes: key → new value (`None` = deleted).
    pub state: HashMap<String, Option<Vec<u8>>>,
    /// Timer changes in call order: key → new due (`None` = cancelled).
    pub timers: TimerOps,
    ops: usize,
    max_value: usize,
    max_ops: usize,
    /// When the call started, and how long it has spent blocked in host
    /// imports (a store read waiting on disk): the deadline limits the
    /// plugin's own time, not the host's.
    started: Option<Instant>,
    host_time: Duration,
    deadline: Duration,
}

impl Call {
    pub fn new(plugin: &str, customer: &str, now: i64, store: Option<Store>) -> Call {
        Call {
            plugin: plugin.to_owned(),
            customer: customer.to_owned(),
            now,
            store,
            ..Call::default()
        }
    }

    fn count_op(&mut self) -> wasmtime::Result<()> {
        self.ops += 1;
        if self.ops > self.max_ops {
            return Err(wasmtime::format_err!(
                "more than {} state, timer and log operations in one call",
                self.max_ops
            ));
        }
        Ok(())
    }
}

/// Per-instance host data.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    call: Call,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

// ---- host capabilities (one interface each) ----

impl v0_1_0::trigger::nudge::plugin::types::Host for HostState {}

impl v0_1_0::trigger::nudge::plugin::state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(v) = self.call.state.get(&key) {
            return Ok(v.clone());
        }
        let Some(store) = &self.call.store else {
            return Ok(None);
        };
        let t = Instant::now();
        let v = store
            .plugin_state(&self.call.customer, &self.call.plugin, &key)
            .map_err(|e| wasmtime::format_err!("state.get({key:?}): {e}"));
        self.call.host_time += t.elapsed();
        v
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.call.count_op()?;
        if value.len() > self.call.max_value {
            return Err(wasmtime::format_err!(
                "state.set({key:?}): {} bytes is over the {}-byte limit",
                value.len(),
                self.call.max_value
            ));
        }
        self.call.state.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.state.insert(key, None);
        Ok(())
    }
}

impl v0_1_0::trigger::nudge::plugin::timers::Host for HostState {
    fn set(&mut self, key: String, due_ms: i64) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.timers.push((key, Some(due_ms)));
        Ok(())
    }

    fn cancel(&mut self, key: String) -> wasmtime::Result<()> {
        self.call.count_op()?;
        self.call.timers.push((key, None));
        Ok(())
    }
}

impl v0_1_0::trigger::nudge::plugin::clock::Host for HostState {
    fn now_ms(&mut self) -> i64 {
        self.call.now
    }
}

impl v0_1_0::trigger::nudge::plugin::log::Host for HostState {
    fn log(
        &mut self,
        level: v0_1_0::trigger::nudge::plugin::log::Level,
        message: String,
    ) -> wasmtime::Result<()> {
        use v0_1_0::trigger::nudge::plugin::log::Level as L;
        self.call.count_op()?;
        let (p, c) = (&self.call.plugin, &self.call.customer);
        match level {
            L::Trace => tracing::trace!(plugin = %p, customer = %c, "{message}"),
            L::Debug => tracing::debug!(plugin = %p, customer = %c, "{message}"),
            L::Info => tracing::info!(plugin = %p, customer = %c, "{message}"),
            L::Warn => tracing::warn!(plugin = %p, customer = %c, "{message}"),
            L::Error => tracing::error!(plugin = %p, customer = %c, "{message}"),
        }
        Ok(())
    }
}

/// Wall and monotonic clocks stopped at zero: plugins read time only
/// through the `clock` import, so replay is deterministic.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Time allowed to instantiate a plugin or ask it to describe itself.
const SETUP_DEADLINE: Duration = Duration::from_secs(2);

/// The engine, the linker with every host capability, and the compile cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    limits: Limits,
    engine_hash: String,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Hex SHA-256: how components and published files are named.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn rt_err(e: impl std::fmt::Display) -> PluginError {
    PluginError::Runtime(e.to_string())
}

impl Runtime {
    /// `cache_dir`: where compiled plugins are kept between runs (created if
    /// missing); `None` compiles every time.
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Runtime, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Plugins are synchronous: no async component model machinery.
        config.concurrency_support(false);
        config.max_wasm_stack(1 << 20);
        let engine = Engine::new(&config).map_err(rt_err)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(rt_err)?;
        v0_1_0::trigger::Trigger::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(rt_err)?;
        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("nudge-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(rt_err)?;
        }
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                PluginError::Runtime(format!("cache folder {}: {e}", dir.display()))
            })?;
        }
        Ok(Runtime {
            engine,
            linker,
            cache_dir,
            limits,
            engine_hash,
            stop_ticker,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn compile(&self, source: &str, bytes: &[u8], hash: &str) -> Result<Component, PluginError> {
        let cached = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{}.cwasm", self.engine_hash)));
        if let Some(path) = &cached {
            if path.exists() {
                // SAFETY: the file was written by `Component::serialize` of an
                // engine with the same compatibility hash, into our own cache
                // folder; a file that fails to load is recompiled.
                match unsafe { Component::deserialize_file(&self.engine, path) } {
                    Ok(c) => return Ok(c),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "cached plugin unusable, recompiling: {e}")
                    }
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            source_name: source.to_owned(),
            message: format!("{e:#}"),
        })?;
        if let Some(path) = &cached {
            // Write then rename, so a concurrent reader never sees half a file.
            let write = || -> std::io::Result<()> {
                let data = component
                    .serialize()
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                std::fs::write(&tmp, data)?;
                std::fs::rename(&tmp, path)
            };
            if let Err(e) = write() {
                tracing::warn!(path = %path.display(), "cannot cache compiled plugin: {e}");
            }
        }
        Ok(component)
    }

    fn new_store(&self, call: Call, manifest: Option<&Manifest>) -> WasmStore<HostState> {
        let mut wasi = WasiCtx::builder();
        if let Some(m) = manifest {
            for (k, v) in &m.config {
                wasi.env(k, v);
            }
        }
        wasi.wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .instances(16)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            call,
        };
        let mut store = WasmStore::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // At each deadline tick: interrupt once the plugin's own time (wall
        // time minus time blocked in host imports) is over the deadline.
        store.epoch_deadline_callback(|ctx| {
            let call = &ctx.data().call;
            let Some(started) = call.started else {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            };
            let own = started.elapsed().saturating_sub(call.host_time);
            if own >= call.deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            let left = (call.deadline - own).as_millis() / EPOCH_TICK.as_millis();
            Ok(wasmtime::UpdateDeadline::Continue(left as u64 + 1))
        });
        store
    }

    fn deadline_ticks(&self) -> u64 {
        (self.limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }

    /// Instantiating and `describe` run outside any call: they get a fixed
    /// budget, at least the call deadline, so a loaded machine does not turn
    /// a fresh instance into a fault.
    fn setup_ticks(&self) -> u64 {
        let budget = self.limits.deadline.max(SETUP_DEADLINE);
        (budget.as_millis() / EPOCH_TICK.as_millis()) as u64 + 1
    }

    /// Compiles (or loads from cache), type-checks against the contract and
    /// asks the plugin to describe itself.
    pub fn load(&self, source: &str, bytes: &[u8]) -> Result<Plugin, PluginError> {
        let hash = hex_sha256(bytes);
        let component = self.compile(source, bytes, &hash)?;
        let contract_err = |e: wasmtime::Error| PluginError::Contract {
            source_name: source.to_owned(),
            message: format!("{e:#}"),
        };
        let ipre = self
            .linker
            .instantiate_pre(&component)
            .map_err(contract_err)?;
        let invalid = |message: String| PluginError::Invalid {
            source_name: source.to_owned(),
            message,
        };
        // SDK plugins export every handler and answer `describe` with a name
        // only for their own kind; other components export just one world.
        let mut tried = Vec::new();
        if let Ok(pre) = v0_1_0::trigger::TriggerPre::new(ipre.clone()) {
            let mut store = self.new_store(Call::default(), None);
            store.set_epoch_deadline(self.setup_ticks());
            let inst = pre.instantiate(&mut store).map_err(contract_err)?;
            let info = inst
                .nudge_plugin_trigger_handler()
                .call_describe(&mut store)
                .map_err(|e| invalid(format!("describe failed: {e:#}")))?;
            if !info.name.is_empty() {
                validate_name(&info.name).map_err(invalid)?;
                return Ok(Plugin {
                    name: info.name,
                    version: info.version,
                    kind: PluginKind::Trigger(TriggerInfo {
                        subscribes: info.subscribes,
                        firings: info.firings,
                    }),
                    contract: "0.1.0",
                    key: hash.clone(),
                    hash,
                    source: source.to_owned(),
                    manifest: Manifest::default(),
                    pre: Pre::Trigger(pre),
                });
            }
            tried.push("trigger");
        }
        if let Ok(pre) = v0_1_0::response::ResponsePre::new(ipre.clone()) {
            let mut store = self.new_store(Call::default(), None);
            store.set_epoch_deadline(self.setup_ticks());
            let inst = pre.instantiate(&mut store).map_err(contract_err)?;
            let (name, version) = inst
                .nudge_plugin_response_handler()
                .call_describe(&mut store)
                .map_err(|e| invalid(format!("describe failed: {e:#}")))?;
            if !name.is_empty() {
                validate_name(&name).map_err(invalid)?;
                return Ok(Plugin {
                    name,
                    version,
                    kind: PluginKind::Response,
                    contract: "0.1.0",
                    key: hash.clone(),
                    hash,
                    source: source.to_owned(),
                    manifest: Manifest::default(),
                    pre: Pre::Response(pre),
                });
            }
            tried.push("response");
        }
        if let Ok(pre) = v0_1_0::channel::ChannelPre::new(ipre) {
            let mut store = self.new_store(Call::default(), None);
            store.set_epoch_deadline(self.setup_ticks());
            let inst = pre.instantiate(&mut store).map_err(contract_err)?;
            let (name, version) = inst
                .nudge_plugin_channel_handler()
                .call_describe(&mut store)
                .map_err(|e| invalid(format!("describe failed: {e:#}")))?;
            if !name.is_empty() {
                validate_name(&name).map_err(invalid)?;
                return Ok(Plugin {
                    name,
                    version,
                    kind: PluginKind::Channel,
                    contract: "0.1.0",
                    key: hash.clone(),
                    hash,
                    source: source.to_owned(),
                    manifest: Manifest::default(),
                    pre: Pre::Channel(pre),
                });
            }
            tried.push("channel");
        }
        Err(PluginError::Contract {
            source_name: source.to_owned(),
            message: if tried.is_empty() {
                "exports none of trigger-handler, response-handler, channel-handler".into()
            } else {
                format!("describe returned an empty name (as {})", tried.join(", "))
            },
        })
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "plugin name {name:?}: use at most 100 letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// Why one plugin call produced nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("trap: {0}")]
    Trap(String),
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    #[error("memory cap exceeded: {0}")]
    Memory(String),
    #[error("plugin returned an error: {0}")]
    Returned(String),
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Deadline(_) => "deadline",
            Fault::Memory(_) => "memory",
            Fault::Returned(_) => "error",
            Fault::Instantiate(_) => "instantiate",
        }
    }
}

fn classify(e: wasmtime::Error, limits: &Limits) -> Fault {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return Fault::Deadline(limits.deadline);
        }
    }
    let text = format!("{e:#}");
    if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
        return Fault::Memory(text);
    }
    Fault::Trap(text)
}

fn value_to_wit(v: &Value) -> wit::Value {
    match v {
        Value::Null => wit::Value::Null,
        Value::Bool(b) => wit::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => wit::Value::Integer(i),
            None => wit::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => wit::Value::Text(s.clone()),
        other => wit::Value::Json(other.to_string()),
    }
}

fn value_from_wit(v: wit::Value) -> Value {
    match v {
        wit::Value::Null => Value::Null,
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Integer(i) => Value::from(i),
        wit::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        wit::Value::Text(s) => Value::String(s),
        wit::Value::Json(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
    }
}

fn fields(m: &Map<String, Value>) -> Vec<wit::Field> {
    m.iter()
        .map(|(k, v)| wit::Field {
            key: k.clone(),
            value: value_to_wit(v),
        })
        .collect()
}

impl From<wit::Firing> for Firing {
    fn from(f: wit::Firing) -> Firing {
        Firing {
            name: f.name,
            data: f
                .data
                .into_iter()
                .map(|f| (f.key, value_from_wit(f.value)))
                .collect(),
        }
    }
}

/// An event and customer converted once, for every plugin that sees them.
pub struct CallInput {
    event: Option<wit::Event>,
    customer: wit::Customer,
}

impl CallInput {
    pub fn new(event: Option<&Event>, customer: &str, traits: &Map<String, Value>) -> CallInput {
        CallInput {
            event: event.map(|e| wit::Event {
                message_id: e.message_id.clone(),
                customer_id: e.customer.clone(),
                kind: match e.kind {
                    Kind::Identify => wit::EventKind::Identify,
                    Kind::Track => wit::EventKind::Track,
                },
                name: e.name.clone(),
                timestamp_ms: e.ts,
                properties: fields(&e.properties),
                traits: fields(&e.traits),
            }),
            customer: wit::Customer {
                id: customer.to_owned(),
                traits: fields(traits),
            },
        }
    }
}

enum Live {
    Trigger(v0_1_0::trigger::Trigger),
    Response(v0_1_0::response::Response),
    Channel(v0_1_0::channel::Channel),
}

struct Instance {
    store: WasmStore<HostState>,
    live: Live,
}

/// One worker's live instances, keyed by [`Plugin::instance_key`]. Not shared: each
/// worker calls its own, so calls never wait on each other.
pub struct Instances {
    runtime: Arc<Runtime>,
    live: HashMap<String, Instance>,
}

/// What a trigger call asked for, to commit if the caller accepts it.
pub struct Effects {
    pub state: HashMap<String, Option<Vec<u8>>>,
    pub timers: TimerOps,
}

impl Instances {
    pub fn new(runtime: Arc<Runtime>) -> Instances {
        Instances {
            runtime,
            live: HashMap::new(),
        }
    }

    /// Drops the instances of plugins no longer in `keep` (after a
    /// generation change), so old versions do not hold memory.
    pub fn retain<'a>(&mut self, keep: impl Iterator<Item = &'a Plugin>) {
        let keep: std::collections::HashSet<&str> = keep.map(|p| p.key.as_str()).collect();
        self.live.retain(|k, _| keep.contains(k.as_str()));
    }

    fn instance(&mut self, plugin: &Plugin) -> Result<&mut Instance, Fault> {
        if !self.live.contains_key(&plugin.key) {
            let mut store = self
                .runtime
                .new_store(Call::default(), Some(&plugin.manifest));
            store.set_epoch_deadline(self.runtime.setup_ticks());
            let live = match &plugin.pre {
                Pre::Trigger(p) => p.instantiate(&mut store).map(Live::Trigger),
                Pre::Response(p) => p.instantiate(&mut store).map(Live::Response),
                Pre::Channel(p) => p.instantiate(&mut store).map(Live::Channel),
            }
            .map_err(|e| Fault::Instantiate(format!("{e:#}")))?;
            self.live
                .insert(plugin.key.clone(), Instance { store, live });
        }
        self.live
            .get_mut(&plugin.key)
            .ok_or_else(|| Fault::Instantiate("instance vanished".into()))
    }

    fn prepare(&mut self, plugin: &Plugin, mut call: Call) -> Result<&mut Instance, Fault> {
        let limits = self.runtime.limits.clone();
        let ticks = self.runtime.deadline_ticks();
        let inst = self.instance(plugin)?;
        call.max_value = limits.max_state_value;
        call.max_ops = limits.max_ops_per_call;
        call.deadline = limits.deadline;
        call.started = Some(Instant::now());
        inst.store.data_mut().call = call;
        inst.store.set_epoch_deadline(ticks);
        Ok(inst)
    }

    fn finish<T>(
        &mut self,
        plugin: &Plugin,
        result: wasmtime::Result<Result<T, String>>,
    ) -> Result<(T, Effects), Fault> {
        match result {
            Ok(Ok(v)) => {
                let inst = self.live.get_mut(&plugin.key);
                let call = inst
                    .map(|i| std::mem::take(&mut i.store.data_mut().call))
                    .unwrap_or_default();
                Ok((
                    v,
                    Effects {
                        state: call.state,
                        timers: call.timers,
                    },
                ))
            }
            Ok(Err(msg)) => {
                if let Some(i) = self.live.get_mut(&plugin.key) {
                    i.store.data_mut().call = Call::default();
                }
                Err(Fault::Returned(msg))
            }
            Err(e) => {
                // A trapped store is poisoned: drop it, the next call gets a
                // fresh instance.
                self.live.remove(&plugin.key);
                Err(classify(e, &self.runtime.limits))
            }
        }
    }

    /// Calls a trigger's `on-event`.
    pub fn on_event(
        &mut self,
        plugin: &Plugin,
        call: Call,
        input: &CallInput,
    ) -> Result<(Vec<Firing>, Effects), Fault> {
        let inst = self.prepare(plugin, call)?;
        let result = match (&inst.live, &input.event) {
            (Live::Trigger(t), Some(ev)) => {
                t.nudge_plugin_trigger_handler()
                    .call_on_event(&mut inst.store, ev, &input.customer)
            }
            _ => Ok(Err("not a trigger plugin, or no event".into())),
        };
        let (firings, fx) = self.finish(plugin, result)?;
        Ok((firings.into_iter().map(Firing::from).collect(), fx))
    }

    /// Calls a trigger's `on-timer`.
    pub fn on_timer(
        &mut self,
        plugin: &Plugin,
        call: Call,
        key: &str,
        input: &CallInput,
    ) -> Result<(Vec<Firing>, Effects), Fault> {
        let inst = self.prepare(plugin, call)?;
        let result = match &inst.live {
            Live::Trigger(t) => t.nudge_plugin_trigger_handler().call_on_timer(
                &mut inst.store,
                key,
                &input.customer,
            ),
            _ => Ok(Err("not a trigger plugin".into())),
        };
        let (firings, fx) = self.finish(plugin, result)?;
        Ok((firings.into_iter().map(Firing::from).collect(), fx))
    }

    /// Calls a response plugin for a decided action.
    pub fn respond(
        &mut self,
        plugin: &Plugin,
        call: Call,
        action: &Action,
        input: &CallInput,
    ) -> Result<Treatment, Fault> {
        let wit_action = wit::Action {
            campaign: action.campaign.clone(),
            channel: action.channel.clone(),
            timestamp_ms: action.ts,
            trigger: action.trigger.clone(),
            firing: wit::Firing {
                name: action.firing.name.clone(),
                data: fields(&action.firing.data),
            },
        };
        let inst = self.prepare(plugin, call)?;
        let result = match &inst.live {
            Live::Response(r) => r.nudge_plugin_response_handler().call_respond(
                &mut inst.store,
                &wit_action,
                &input.customer,
            ),
            _ => Ok(Err("not a response plugin".into())),
        };
        let (t, _) = self.finish(plugin, result)?;
        Ok(treatment_from_wit(t))
    }
}

impl Instances {
    /// Calls a channel plugin: what should the host send for `treatment`?
    pub fn deliver(
        &mut self,
        plugin: &Plugin,
        call: Call,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, Fault> {
        let t = treatment_to_wit(treatment);
        let r = wit::Recipient {
            customer_id: recipient.customer.clone(),
            email: recipient.email.clone(),
            phone: recipient.phone.clone(),
        };
        let inst = self.prepare(plugin, call)?;
        let result = match &inst.live {
            Live::Channel(c) => {
                c.nudge_plugin_channel_handler()
                    .call_deliver(&mut inst.store, &t, &r)
            }
            _ => Ok(Err("not a channel plugin".into())),
        };
        let (out, _) = self.finish(plugin, result)?;
        Ok(out
            .into_iter()
            .map(|o| match o {
                wit::Outbound::Email(m) => Outbound::Email {
                    to: m.to,
                    subject: m.subject,
                    body: m.body,
                },
                wit::Outbound::Http(h) => Outbound::Http {
                    method: h.method,
                    url: h.url,
                    headers: h.headers,
                    body: h.body,
                },
                wit::Outbound::AgentQueue(t) => Outbound::AgentQueue(treatment_from_wit(t)),
            })
            .collect())
    }
}

fn treatment_to_wit(t: &Treatment) -> wit::Treatment {
    wit::Treatment {
        subject: t.subject.clone(),
        body: t.body.clone(),
        agent_script: t.agent_script.clone(),
        variables: fields(&t.variables),
    }
}

fn treatment_from_wit(t: wit::Treatment) -> Treatment {
    Treatment {
        subject: t.subject,
        body: t.body,
        agent_script: t.agent_script,
        variables: t
            .variables
            .into_iter()
            .map(|f| (f.key, value_from_wit(f.value)))
            .collect(),
    }
}

/// Who a treatment goes to, as far as the host knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipient {
    pub customer: String,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// What a channel plugin asked the host to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    Email {
        to: String,
        subject: String,
        body: String,
    },
    Http {
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    AgentQueue(Treatment),
}

/// A decided action, for a response plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub campaign: String,
    pub channel: String,
    pub ts: i64,
    pub trigger: String,
    pub firing: Firing,
}

/// A response plugin's pre-thought action.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Treatment {
    pub subject: String,
    pub body: String,
    pub agent_script: String,
    pub variables: Map<String, Value>,
}
