//! The engine, the linker with every host capability, the compile cache,
//! and loading a component as a plugin of its kind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store as WasmStore, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtx;

use super::host::{Call, HostState};
use super::plugin::{Plugin, PluginKind, Pre, TriggerInfo};
use super::sandbox::{self, FrozenClock, Output, Seeds};
use super::{v0_1_0, Limits, PluginError};
use crate::manifest::Manifest;

const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most bytes one `wasi:random` call may ask for.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// Time allowed to instantiate a plugin or ask it to describe itself.
const SETUP_DEADLINE: Duration = Duration::from_secs(2);

/// The engine, the linker with every host capability, and the compile cache.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    pub(super) limits: Limits,
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
        sandbox::add_to_linker(&mut linker).map_err(rt_err)?;
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

    pub(super) fn new_store(
        &self,
        call: Call,
        manifest: Option<&Manifest>,
    ) -> WasmStore<HostState> {
        let mut wasi = WasiCtx::builder();
        let mut memory = self.limits.memory_bytes;
        if let Some(m) = manifest {
            for (k, v) in &m.config {
                wasi.env(k, v);
            }
            memory = self.limits.for_plugin(&m.limits).memory_bytes;
        }
        let seeds = Seeds::default();
        let output = Output::default();
        wasi.wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(seeds.secure())
            .insecure_random(seeds.insecure())
            // What `HashMap`s are keyed with: fixed, so their order is the
            // same in every run.
            .insecure_random_seed(0x006e_7564_6765)
            .max_random_size(MAX_RANDOM_BYTES)
            .stdout(output.stdout())
            .stderr(output.stderr())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(sandbox::MAX_RESOURCES);
        let state = HostState {
            wasi: wasi.build(),
            table,
            seeds,
            output,
            limits: StoreLimitsBuilder::new()
                .memory_size(memory)
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
            let deadline = call.limits.deadline;
            if own >= deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            let left = (deadline - own).as_millis() / EPOCH_TICK.as_millis();
            Ok(wasmtime::UpdateDeadline::Continue(left as u64 + 1))
        });
        store
    }

    /// Epoch ticks until a call with `deadline` is first checked.
    pub(super) fn ticks_for(&self, deadline: Duration) -> u64 {
        (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }

    /// Instantiating and `describe` run outside any call: they get a fixed
    /// budget, at least the call deadline, so a loaded machine does not turn
    /// a fresh instance into a fault.
    pub(super) fn setup_ticks(&self) -> u64 {
        let budget = self.limits.deadline.max(SETUP_DEADLINE);
        (budget.as_millis() / EPOCH_TICK.as_millis()) as u64 + 1
    }

    /// Compiles (or loads from cache), type-checks against the contract and
    /// asks the plugin to describe itself.
    ///
    /// Runs off any async runtime's thread (see [`super::off_runtime`]):
    /// `describe` is plugin code.
    pub fn load(&self, source: &str, bytes: &[u8]) -> Result<Plugin, PluginError> {
        super::off_runtime(|| self.load_here(source, bytes))
    }

    fn load_here(&self, source: &str, bytes: &[u8]) -> Result<Plugin, PluginError> {
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
