//! Hot reload: teams publish plugins and campaigns as files; the host
//! watches the folders, builds a new [`Generation`] from what is there,
//! validates it and swaps it in, keeping the last good one whenever a build
//! fails.
//!
//! - A build reads every source file once and works from those bytes, so a
//!   generation's recorded hashes are exactly what it runs.
//! - Components are compiled once per content hash: in memory across
//!   generations (an unchanged plugin costs a clone) and on disk across
//!   restarts (the runtime's artifact cache).
//! - Every build gets a number, good or not. A good one records its
//!   plugins (names, versions, hashes), rule files (hashes), who wrote each
//!   file and when, and is archived in the store (files by content hash),
//!   so it can be activated again later: from memory while kept, rebuilt
//!   from the archive after that or after a restart.
//! - Workers load the current generation once per batch of events; a swap
//!   takes effect at the next batch. Swapping never touches the inbox or
//!   the watermarks, so no event is lost or decided twice by a reload.

mod sharing;

pub use sharing::{Files, Sharing};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::PluginGrant;
use crate::controls::Controls;
use crate::event::{format_ts, now_ms};
use crate::generation::{Current, Generation};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::plugins::{hex_sha256, Plugin, Runtime};
use crate::replay::PluginSource;
use crate::rules::{rule_files, RuleSet};
use crate::store::{Store, StoreError};

const RECORD_PREFIX: &str = "generation/";
/// Where a generation's files are archived in the store, by content hash.
pub(crate) const BLOB_PREFIX: &str = "blob/";

/// Where a generation's files come from, and the operator's grants.
#[derive(Clone, Debug)]
pub struct Sources {
    pub plugins: PluginSource,
    pub rules: PathBuf,
    pub grants: BTreeMap<String, PluginGrant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Plugin,
    Manifest,
    Rule,
}

/// One file a generation was built from: what, who wrote it, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub role: Role,
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// The file's modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified: Option<String>,
    /// The file's owner (user name, or `uid N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// In force.
    Active,
    /// Kept in memory: activation is a pointer swap.
    Ready,
    /// Its files are in the store: activation rebuilds it.
    Archived,
    /// Failed validation; never activated.
    Rejected,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub number: u64,
    pub status: Status,
    pub created_at: String,
    /// What started the build: `start`, the files that changed, `reload
    /// requested`, or `rescan`.
    pub cause: String,
    pub plugins: Vec<PluginRecord>,
    pub campaigns: Vec<String>,
    pub files: Vec<FileRecord>,
    /// Why it was rejected: file, line, field or plugin, and reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    pub build_ms: f64,
    /// When it was last made the active generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_by: Option<String>,
    /// Which activation that was, counting every activation of every
    /// generation: orders them (rollback, start-up) without trusting the
    /// wall clock. 0: never active.
    #[serde(default)]
    pub activation: u64,
    /// Over every file's path and hash: equal fingerprints, equal inputs.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("generation {number} was rejected: {}", errors.join("; "))]
    Rejected { number: u64, errors: Vec<String> },
    #[error("no generation {0}")]
    Unknown(u64),
    #[error("generation {number} cannot be rebuilt from its archive: {}", errors.join("; "))]
    Archive { number: u64, errors: Vec<String> },
    #[error("generation {0} is neither kept nor archived (run without a store?)")]
    Unavailable(u64),
    #[error("no earlier good generation to roll back to")]
    NothingToRollBack,
    #[error("watching {path}: {message}")]
    Watch { path: PathBuf, message: String },
    /// The cluster's generations did not answer: nothing changed.
    #[error("the cluster's generations: {0}")]
    Shared(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Activated(u64),
    /// The files are the ones the last build saw: nothing to do.
    Unchanged,
    Rejected(u64),
    /// The cluster's generations were out of reach: nothing was built, the
    /// active generation keeps running.
    Unshared(String),
}

/// A file as read for one build.
struct SourceFile {
    path: PathBuf,
    bytes: Result<Vec<u8>, String>,
    record: FileRecord,
}

/// Everything one build reads, read once.
struct Snapshot {
    files: Vec<SourceFile>,
    /// Errors reading the folders themselves.
    errors: Vec<String>,
    fingerprint: String,
}

/// File owners' names: `/etc/passwd` read once per build (the plain
/// reading; no NSS), not once per file.
#[derive(Default)]
struct Owners(Option<HashMap<u32, String>>);

impl Owners {
    #[cfg(unix)]
    fn name(&mut self, uid: u32) -> String {
        let users = self.0.get_or_insert_with(|| {
            std::fs::read_to_string("/etc/passwd")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_owned()))
                })
                .collect()
        });
        users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| format!("uid {uid}"))
    }
}

/// The plugins folder's rule for where a component's manifest is (the
/// examples built in carry theirs as `embedded:NAME/nudge-plugin.toml`).
fn manifest_path(plugins: &PluginSource, wasm: &Path) -> PathBuf {
    match plugins {
        PluginSource::Embedded => wasm.join("nudge-plugin.toml"),
        PluginSource::Dir(_) => Manifest::path_beside(wasm),
    }
}

/// Publishes `bytes` as `dir/name` the way a watched folder should be
/// written: under a hidden temporary name (which no build reads), then
/// renamed into place, so no build ever reads half a file.
pub fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

fn file_meta(path: &Path, owners: &mut Owners) -> (Option<String>, Option<String>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return (None, None);
    };
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format_ts(d.as_millis() as i64));
    #[cfg(unix)]
    let owner = {
        use std::os::unix::fs::MetadataExt;
        Some(owners.name(meta.uid()))
    };
    #[cfg(not(unix))]
    let owner = {
        let _ = owners;
        None
    };
    (modified, owner)
}

impl SourceFile {
    fn read(role: Role, path: PathBuf, owners: &mut Owners) -> SourceFile {
        let bytes =
            std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()));
        let (modified, owner) = file_meta(&path, owners);
        SourceFile::new(role, path, bytes, modified, owner)
    }

    fn new(
        role: Role,
        path: PathBuf,
        bytes: Result<Vec<u8>, String>,
        modified: Option<String>,
        owner: Option<String>,
    ) -> SourceFile {
        let (sha256, len) = match &bytes {
            Ok(b) => (hex_sha256(b), b.len() as u64),
            Err(_) => (String::new(), 0),
        };
        SourceFile {
            record: FileRecord {
                role,
                path: path.display().to_string(),
                sha256,
                bytes: len,
                modified,
                owner,
            },
            path,
            bytes,
        }
    }
}

impl Snapshot {
    /// `grants`: the operator's grants take part in the fingerprint, so a
    /// changed grant is a changed generation.
    fn finish(files: Vec<SourceFile>, errors: Vec<String>, grants: &Sources) -> Snapshot {
        let mut fp = format!("{:?}\0", grants.grants);
        for f in &files {
            fp.push_str(&format!("{}\0{}\0", f.record.path, f.record.sha256));
        }
        for e in &errors {
            fp.push_str(e);
        }
        Snapshot {
            fingerprint: hex_sha256(fp.as_bytes()),
            files,
            errors,
        }
    }

    /// Reads the plugins and rules folders as they are now.
    fn read(sources: &Sources) -> Snapshot {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        let mut owners = Owners::default();
        match &sources.plugins {
            PluginSource::Embedded => {
                for (name, bytes, manifest) in crate::embedded::EMBEDDED {
                    let path = PathBuf::from(format!("embedded:{name}"));
                    files.push(SourceFile::new(
                        Role::Manifest,
                        manifest_path(&sources.plugins, &path),
                        Ok(manifest.as_bytes().to_vec()),
                        None,
                        None,
                    ));
                    files.push(SourceFile::new(
                        Role::Plugin,
                        path,
                        Ok(bytes.to_vec()),
                        None,
                        None,
                    ));
                }
            }
            PluginSource::Dir(dir) => match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut wasm: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "wasm") && p.is_file())
                        .collect();
                    wasm.sort();
                    for w in wasm {
                        let manifest = manifest_path(&sources.plugins, &w);
                        if manifest.is_file() {
                            files.push(SourceFile::read(Role::Manifest, manifest, &mut owners));
                        }
                        files.push(SourceFile::read(Role::Plugin, w, &mut owners));
                    }
                }
                Err(e) => errors.push(format!(
                    "{}: cannot read the plugins folder: {e}",
                    dir.display()
                )),
            },
        }
        match rule_files(&sources.rules) {
            Ok(rules) => files.extend(
                rules
                    .into_iter()
                    .map(|r| SourceFile::read(Role::Rule, r, &mut owners)),
            ),
            Err(e) => errors.extend(e.0.iter().map(ToString::to_string)),
        }
        Snapshot::finish(files, errors, sources)
    }

    /// A generation's files as archived in the store, placed in the folders
    /// configured now: the archive holds every byte a generation needs, so
    /// it rebuilds after the folders moved too.
    fn archived(
        store: &Store,
        record: &GenerationRecord,
        sources: &Sources,
    ) -> Result<Snapshot, ReloadError> {
        let mut files = Vec::new();
        for f in &record.files {
            let Some(bytes) = store.meta(&format!("{BLOB_PREFIX}{}", f.sha256))? else {
                return Err(ReloadError::Unavailable(record.number));
            };
            let recorded = PathBuf::from(&f.path);
            let dir = match (&f.role, &sources.plugins) {
                (Role::Rule, _) => Some(sources.rules.as_path()),
                (Role::Plugin | Role::Manifest, PluginSource::Dir(d)) => Some(d.as_path()),
                (_, PluginSource::Embedded) => None,
            };
            let path = match (dir, recorded.file_name()) {
                (Some(d), Some(name)) => d.join(name),
                _ => recorded,
            };
            let mut record = f.clone();
            record.path = path.display().to_string();
            files.push(SourceFile {
                path,
                bytes: Ok(bytes),
                record,
            });
        }
        Ok(Snapshot::finish(files, Vec::new(), sources))
    }
}

/// Builds and validates generation `number` from `snap`. `loaded`: the
/// components already compiled, by hash (updated).
fn build(
    runtime: &Runtime,
    sources: &Sources,
    snap: &Snapshot,
    number: u64,
    loaded: &mut HashMap<String, Plugin>,
) -> Result<Generation, Vec<String>> {
    let mut errors = snap.errors.clone();
    let manifests: HashMap<&Path, &SourceFile> = snap
        .files
        .iter()
        .filter(|f| f.record.role == Role::Manifest)
        .map(|f| (f.path.as_path(), f))
        .collect();
    let mut plugins = Vec::new();
    for f in snap.files.iter().filter(|f| f.record.role == Role::Plugin) {
        let bytes = match &f.bytes {
            Ok(b) => b,
            Err(e) => {
                errors.push(e.clone());
                continue;
            }
        };
        let source = f.record.path.clone();
        let mut plugin = match loaded.get(&f.record.sha256) {
            Some(p) => p.clone(),
            None => match runtime.load(&source, bytes) {
                Ok(p) => {
                    loaded.insert(f.record.sha256.clone(), p.clone());
                    p
                }
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            },
        };
        plugin.source = source;
        let manifest = match manifests.get(manifest_path(&sources.plugins, &f.path).as_path()) {
            None => Ok(Manifest::default()),
            Some(m) => match &m.bytes {
                Ok(b) => Manifest::parse(&m.record.path, &String::from_utf8_lossy(b)),
                Err(e) => Err(e.clone()),
            },
        };
        match manifest {
            Ok(m) => plugin.set_manifest(m.granted(sources.grants.get(&plugin.name))),
            Err(e) => {
                errors.push(format!("plugin {}: manifest: {e}", plugin.name));
                continue;
            }
        }
        plugins.push(plugin);
    }
    for name in sources.grants.keys() {
        if !plugins.iter().any(|p| &p.name == name) {
            let loaded: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
            errors.push(format!(
                "config [plugins.{name}]: no plugin named {name:?} is loaded (loaded: {})",
                if loaded.is_empty() {
                    "none".to_owned()
                } else {
                    loaded.join(", ")
                }
            ));
        }
    }
    let rule_files = snap
        .files
        .iter()
        .filter(|f| f.record.role == Role::Rule)
        .map(|f| (f.path.clone(), f.bytes.clone()))
        .collect();
    let rules = RuleSet::from_files(&sources.rules, rule_files)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>());
    let rules = match rules {
        Ok(r) => r,
        Err(e) => {
            errors.extend(e);
            return Err(errors);
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Generation::build(number, plugins, rules)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

struct State {
    records: BTreeMap<u64, GenerationRecord>,
    kept: BTreeMap<u64, Arc<Generation>>,
    next: u64,
    active: u64,
    /// Activations so far: orders [`GenerationRecord::activation`].
    activations: u64,
    /// The fingerprint of the last build, good or not: the same files are
    /// not built twice in a row (unless forced).
    last_fingerprint: String,
}

/// Compiled components by content hash.
type Loaded = HashMap<String, Plugin>;

/// Builds, keeps and activates generations.
pub struct Reloader {
    runtime: Arc<Runtime>,
    sources: Sources,
    current: Arc<Current>,
    controls: Arc<Controls>,
    store: Option<Store>,
    metrics: Option<Arc<Metrics>>,
    /// Good generations kept in memory besides the active one.
    keep: usize,
    /// Records kept; see [`Reloader::prune`].
    history: usize,
    /// Held for a whole build or activation, so they happen one at a time,
    /// each on the files as it read them after the one before finished.
    builder: Mutex<Loaded>,
    /// Held only for bookkeeping, never across a build: listing does not
    /// wait for a compilation.
    state: Mutex<State>,
    /// The cluster's generations, once shared ([`Reloader::share_with`]).
    sharing: std::sync::OnceLock<Arc<dyn Sharing>>,
}

/// Whether the record's last activation was an operator's choice
/// (activate, rollback) rather than the files'.
fn by_operator(r: &GenerationRecord) -> bool {
    r.activated_by
        .as_deref()
        .is_some_and(|b| b.starts_with("activated by") || b.starts_with("rollback by"))
}

/// A publish that looks half-done is refused unless forced: a component
/// whose manifest disappeared (it would run without the capabilities it
/// had), or no campaign left where the active generation has some.
fn guard(
    sources: &Sources,
    gen: &Generation,
    snap: &Snapshot,
    active: Option<&GenerationRecord>,
) -> Result<(), Vec<String>> {
    let Some(active) = active else { return Ok(()) };
    let mut errors = Vec::new();
    if let PluginSource::Dir(_) = &sources.plugins {
        let had: BTreeSet<&str> = active
            .files
            .iter()
            .filter(|f| f.role == Role::Manifest)
            .map(|f| f.path.as_str())
            .collect();
        let has: BTreeSet<String> = snap
            .files
            .iter()
            .filter(|f| f.record.role == Role::Manifest)
            .map(|f| f.record.path.clone())
            .collect();
        for f in snap.files.iter().filter(|f| f.record.role == Role::Plugin) {
            let manifest = manifest_path(&sources.plugins, &f.path)
                .display()
                .to_string();
            if had.contains(manifest.as_str()) && !has.contains(&manifest) {
                errors.push(format!(
                    "{manifest}: the manifest of {} disappeared; publish it with the component (an empty one grants nothing), or force the reload",
                    f.record.path
                ));
            }
        }
    }
    if gen.rules.campaigns.is_empty() && !active.campaigns.is_empty() {
        errors.push(format!(
            "{}: no campaign left (the active generation has {}); if that is meant, force the reload",
            sources.rules.display(),
            active.campaigns.len()
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

impl Reloader {
    /// Builds the first generation. The generation an operator activated
    /// last (a rollback) stands across a restart, even if the folders
    /// differ from it. Otherwise the folders are built; if they do not
    /// validate and the store has the generation that was active last, that
    /// one starts instead (and the rejection is listed), so a bad publish
    /// cannot keep the server from starting.
    pub fn start(
        runtime: Arc<Runtime>,
        sources: Sources,
        controls: Arc<Controls>,
        store: Option<Store>,
        metrics: Option<Arc<Metrics>>,
        keep: usize,
        history: usize,
    ) -> Result<Arc<Reloader>, ReloadError> {
        let mut records = BTreeMap::new();
        if let Some(s) = &store {
            for (key, value) in s.meta_scan(RECORD_PREFIX)? {
                match serde_json::from_slice::<GenerationRecord>(&value) {
                    Ok(mut r) => {
                        if r.status != Status::Rejected {
                            r.status = Status::Archived;
                        }
                        records.insert(r.number, r);
                    }
                    Err(e) => tracing::warn!(key, "unreadable generation record skipped: {e}"),
                }
            }
        }
        let next = records.keys().next_back().map_or(1, |n| n + 1);
        let activations = records.values().map(|r| r.activation).max().unwrap_or(0);
        let last_active: Option<&GenerationRecord> = records
            .values()
            .filter(|r| r.status == Status::Archived && r.activated_at.is_some())
            .max_by_key(|r| (r.activation, r.number));
        let snap = Snapshot::read(&sources);
        let mut loaded = Loaded::new();
        let started = Instant::now();
        let from_archive = |r: &GenerationRecord, loaded: &mut Loaded| {
            let store = store.as_ref().ok_or("no store")?;
            let snap = Snapshot::archived(store, r, &sources).map_err(|e| e.to_string())?;
            build(&runtime, &sources, &snap, r.number, loaded).map_err(|e| e.join("; "))
        };

        // (generation, errors of the folders if rejected, whether this start
        // used up a number, whether the folders are what runs)
        let mut chosen = None;
        if let Some(r) = last_active.filter(|r| by_operator(r) && r.fingerprint != snap.fingerprint)
        {
            match from_archive(r, &mut loaded) {
                Ok(g) => {
                    tracing::warn!(
                        generation = r.number,
                        by = r.activated_by.as_deref().unwrap_or(""),
                        "starting with the generation an operator activated; the folders differ from it and are built at their next change"
                    );
                    chosen = Some((g, None, false, false));
                }
                Err(e) => tracing::error!(
                    generation = r.number,
                    "the generation an operator activated cannot be rebuilt from the archive ({e}); building the folders"
                ),
            }
        }
        let (gen, rejected, numbered, published) = match chosen {
            Some(c) => c,
            None => {
                let same = last_active.filter(|r| r.fingerprint == snap.fingerprint);
                match build(
                    &runtime,
                    &sources,
                    &snap,
                    same.map_or(next, |r| r.number),
                    &mut loaded,
                ) {
                    Ok(g) => (g, None, same.is_none(), true),
                    Err(errors) => {
                        match last_active.map(|r| (r.number, from_archive(r, &mut loaded))) {
                            Some((_, Ok(g))) => {
                                tracing::error!(
                                generation = g.number,
                                "the folders do not validate; starting with the generation active last:\n  {}",
                                errors.join("\n  ")
                            );
                                (g, Some(errors), true, false)
                            }
                            Some((n, Err(e))) => {
                                tracing::error!(generation = n, "the generation active last cannot be rebuilt from the archive either: {e}");
                                return Err(ReloadError::Rejected {
                                    number: next,
                                    errors,
                                });
                            }
                            None => {
                                return Err(ReloadError::Rejected {
                                    number: next,
                                    errors,
                                })
                            }
                        }
                    }
                }
            }
        };
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        let current = Arc::new(Current::new(gen));
        let gen = current.load();
        let reloader = Arc::new(Reloader {
            runtime,
            sources,
            current,
            controls,
            store,
            metrics,
            keep: keep.max(1),
            history: history.max(1),
            builder: Mutex::new(Loaded::new()),
            sharing: std::sync::OnceLock::new(),
            state: Mutex::new(State {
                records,
                kept: BTreeMap::new(),
                next: if numbered { next + 1 } else { next },
                active: gen.number,
                activations,
                last_fingerprint: snap.fingerprint.clone(),
            }),
        });
        {
            let mut builder = reloader.lock_builder();
            *builder = loaded;
            let mut st = reloader.lock();
            match rejected {
                Some(errors) => {
                    let r = record(next, "start", &snap, None, errors, build_ms);
                    reloader.save(&r);
                    st.records.insert(next, r);
                }
                None if numbered => {
                    let r = record(next, "start", &snap, Some(&gen), Vec::new(), build_ms);
                    reloader.archive(&snap);
                    st.records.insert(next, r);
                }
                // The same files as before: archive again what an earlier
                // failure may have left out.
                None if published => reloader.archive(&snap),
                None => {}
            }
            reloader.activated(&mut st, &mut builder, gen, "start", published);
            reloader.prune(&mut st);
        }
        Ok(reloader)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_builder(&self) -> MutexGuard<'_, Loaded> {
        self.builder.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.clone()
    }

    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    pub fn active(&self) -> u64 {
        self.lock().active
    }

    fn save(&self, r: &GenerationRecord) {
        if let Some(s) = &self.store {
            let key = format!("{RECORD_PREFIX}{:020}", r.number);
            let json = serde_json::to_vec(r).unwrap_or_default();
            if let Err(e) = s.put_meta(&key, &json) {
                tracing::error!(generation = r.number, "generation record not stored: {e}");
            }
        }
    }

    /// Keeps a good generation's files in the store, by content hash.
    fn archive(&self, snap: &Snapshot) {
        let Some(s) = &self.store else { return };
        for f in &snap.files {
            let Ok(bytes) = &f.bytes else { continue };
            let key = format!("{BLOB_PREFIX}{}", f.record.sha256);
            let result =
                s.has_meta(&key)
                    .and_then(|has| if has { Ok(()) } else { s.put_meta(&key, bytes) });
            if let Err(e) = result {
                tracing::warn!(file = %f.record.path, "not archived (rollback after a restart will not have it): {e}");
            }
        }
    }

    /// Makes `gen` current and records it (state and builder locks held).
    /// `published`: it comes from the folders (a new publish), so
    /// quarantines of versions it replaces clear; an operator's activation
    /// of an older generation does not lift them.
    fn activated(
        &self,
        st: &mut State,
        loaded: &mut Loaded,
        gen: Arc<Generation>,
        by: &str,
        published: bool,
    ) {
        let number = gen.number;
        self.current.store(gen.clone());
        if published {
            self.controls.on_generation(&gen);
        }
        let previous = std::mem::replace(&mut st.active, number);
        if let Some(r) = st.records.get_mut(&previous) {
            if previous != number && r.status == Status::Active {
                r.status = Status::Ready;
            }
        }
        st.kept.insert(number, gen);
        // Keep the newest `keep` others in memory; older ones stay archived.
        while st.kept.len() > self.keep + 1 {
            let Some(oldest) = st.kept.keys().copied().find(|n| *n != number) else {
                break;
            };
            st.kept.remove(&oldest);
            if let Some(r) = st.records.get_mut(&oldest) {
                r.status = Status::Archived;
            }
        }
        // Compiled components no kept generation uses are dropped.
        let used: BTreeSet<&str> = st
            .kept
            .values()
            .flat_map(|g| g.plugins.iter().map(|p| p.hash.as_str()))
            .collect();
        loaded.retain(|h, _| used.contains(h.as_str()));
        st.activations += 1;
        let activation = st.activations;
        if let Some(r) = st.records.get_mut(&number) {
            r.status = Status::Active;
            r.activated_at = Some(format_ts(now_ms()));
            r.activated_by = Some(by.to_owned());
            r.activation = activation;
            let r = r.clone();
            self.save(&r);
        }
        if let Some(m) = &self.metrics {
            m.generation_active.set(number as i64);
        }
        tracing::info!(generation = number, by, "generation active");
    }

    /// Deletes the oldest records past `history` (never the active, a kept
    /// or the newest one), then the archived files no remaining good record
    /// uses.
    fn prune(&self, st: &mut State) {
        let excess = st.records.len().saturating_sub(self.history);
        if excess == 0 {
            return;
        }
        let newest = st.records.keys().next_back().copied();
        let victims: Vec<u64> = st
            .records
            .keys()
            .copied()
            .filter(|n| *n != st.active && !st.kept.contains_key(n) && Some(*n) != newest)
            .take(excess)
            .collect();
        for n in &victims {
            st.records.remove(n);
        }
        let Some(store) = &self.store else { return };
        let result = (|| -> Result<usize, StoreError> {
            for n in &victims {
                store.remove_meta(&format!("{RECORD_PREFIX}{n:020}"))?;
            }
            let used: BTreeSet<&str> = st
                .records
                .values()
                .filter(|r| r.status != Status::Rejected)
                .flat_map(|r| r.files.iter().map(|f| f.sha256.as_str()))
                .collect();
            let mut removed = 0;
            for key in store.meta_keys(BLOB_PREFIX)? {
                if !used.contains(&key[BLOB_PREFIX.len()..]) {
                    store.remove_meta(&key)?;
                    removed += 1;
                }
            }
            store.sync()?;
            Ok(removed)
        })();
        match result {
            Ok(files) => tracing::info!(records = victims.len(), files, "old generations pruned"),
            Err(e) => tracing::warn!("pruning old generations: {e}"),
        }
    }

    /// Reads the folders and, if anything changed since the last build (or
    /// `force`), builds, validates and activates a new generation. `force`
    /// also lets a publish through that looks half-done (see [`guard`]).
    pub fn reload(&self, cause: &str, force: bool) -> Outcome {
        let started = Instant::now();
        let mut loaded = self.lock_builder();
        let snap = Snapshot::read(&self.sources);
        let active = {
            let mut st = self.lock();
            if !force && snap.fingerprint == st.last_fingerprint {
                if let Some(m) = &self.metrics {
                    m.reload("unchanged", started.elapsed());
                }
                return Outcome::Unchanged;
            }
            st.last_fingerprint = snap.fingerprint.clone();
            st.records.get(&st.active).cloned()
        };
        let number = match self.take_number(&snap, force) {
            Ok(Some(n)) => n,
            // What the cluster runs already.
            Ok(None) => {
                if let Some(m) = &self.metrics {
                    m.reload("unchanged", started.elapsed());
                }
                return Outcome::Unchanged;
            }
            Err(e) => return self.unshared(None, e),
        };
        let built = build(&self.runtime, &self.sources, &snap, number, &mut loaded).and_then(|g| {
            if force {
                return Ok(g);
            }
            guard(&self.sources, &g, &snap, active.as_ref()).map(|()| g)
        });
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        let built = built.map(|g| {
            let r = record(number, cause, &snap, Some(&g), Vec::new(), build_ms);
            (g, r)
        });
        if let (Ok((_, r)), true) = (&built, self.is_shared()) {
            // Published before it runs here: every node runs what the
            // cluster runs, this one included (adopting it is then a no-op).
            let files = snap
                .files
                .iter()
                .filter_map(|f| Some((f.record.sha256.clone(), f.bytes.as_ref().ok()?.clone())))
                .collect();
            if let Err(e) = self.share(r, files, cause) {
                return self.unshared(Some(number), e);
            }
        }
        let mut st = self.lock();
        match built {
            Ok((gen, r)) => {
                self.archive(&snap);
                st.records.insert(number, r);
                self.activated(&mut st, &mut loaded, Arc::new(gen), cause, true);
                self.prune(&mut st);
                if let Some(m) = &self.metrics {
                    m.reload("activated", started.elapsed());
                }
                Outcome::Activated(number)
            }
            Err(errors) => {
                tracing::error!(
                    generation = number,
                    active = st.active,
                    cause,
                    "new files rejected, the active generation keeps running:\n  {}",
                    errors.join("\n  ")
                );
                let r = record(number, cause, &snap, None, errors, build_ms);
                self.save(&r);
                st.records.insert(number, r);
                self.prune(&mut st);
                if let Some(m) = &self.metrics {
                    m.reload("rejected", started.elapsed());
                }
                Outcome::Rejected(number)
            }
        }
    }

    /// Makes generation `number` active again (a rollback, or a roll
    /// forward after one).
    pub fn activate(&self, number: u64, by: &str) -> Result<GenerationRecord, ReloadError> {
        self.activate_as(number, by, true, false)
    }

    /// [`Reloader::activate`]; `share`: publish it to the cluster first
    /// (an operator's choice, not an adoption); `published`: it is a new
    /// publish (quarantines of versions it replaces clear).
    fn activate_as(
        &self,
        number: u64,
        by: &str,
        share: bool,
        published: bool,
    ) -> Result<GenerationRecord, ReloadError> {
        let mut loaded = self.lock_builder();
        let (record, kept, active) = {
            let st = self.lock();
            let record = st
                .records
                .get(&number)
                .cloned()
                .ok_or(ReloadError::Unknown(number))?;
            (record, st.kept.get(&number).cloned(), st.active)
        };
        if record.status == Status::Rejected {
            return Err(ReloadError::Rejected {
                number,
                errors: record.errors,
            });
        }
        if share && self.is_shared() {
            let files = self.archived_files(&record)?;
            self.share(&record, files, by)
                .map_err(ReloadError::Shared)?;
        }
        if active != number {
            let gen = match kept {
                Some(g) => g,
                None => {
                    let store = self
                        .store
                        .as_ref()
                        .ok_or(ReloadError::Unavailable(number))?;
                    let snap = Snapshot::archived(store, &record, &self.sources)?;
                    let gen = build(&self.runtime, &self.sources, &snap, number, &mut loaded)
                        .map_err(|errors| ReloadError::Archive { number, errors })?;
                    Arc::new(gen)
                }
            };
            let mut st = self.lock();
            self.activated(&mut st, &mut loaded, gen, by, published);
        }
        self.lock()
            .records
            .get(&number)
            .cloned()
            .ok_or(ReloadError::Unknown(number))
    }

    /// Activates the good generation that was active before the current
    /// one.
    pub fn rollback(&self, by: &str) -> Result<GenerationRecord, ReloadError> {
        let target = {
            let st = self.lock();
            st.records
                .values()
                .filter(|r| r.number != st.active && r.status != Status::Rejected)
                .filter(|r| r.activated_at.is_some())
                .max_by_key(|r| (r.activation, r.number))
                .map(|r| r.number)
                .ok_or(ReloadError::NothingToRollBack)?
        };
        self.activate(target, by)
    }

    /// Every generation, newest first.
    pub fn list(&self) -> Vec<GenerationRecord> {
        self.lock().records.values().rev().cloned().collect()
    }

    /// Watches the plugins and rules folders: a change reloads once the
    /// folders have been quiet for `debounce` (so a file being written is
    /// not read half-way; a half-written file that still gets read fails
    /// validation and the completed write builds again). `rescan` (if not
    /// zero) also reloads periodically, for file systems whose change
    /// notices are unreliable (NFS, some container mounts). If the folders
    /// cannot be watched (the inotify limit, say), the rescan carries on
    /// alone and the error is logged.
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
        rescan: Duration,
        stop: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<()>, ReloadError> {
        use notify::{RecursiveMode, Watcher};
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dirs = vec![self.sources.rules.clone()];
        if let PluginSource::Dir(d) = &self.sources.plugins {
            dirs.push(d.clone());
        }
        let watcher = notify::recommended_watcher(move |res| {
            let _ = tx.send(res);
        })
        .map_err(|e| e.to_string())
        .and_then(|mut w| {
            for d in &dirs {
                w.watch(d, RecursiveMode::NonRecursive)
                    .map_err(|e| format!("{}: {e}", d.display()))?;
            }
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) if rescan.is_zero() => {
                tracing::error!("cannot watch the folders ({e}); with reload.rescan = 0 only POST /v1/generations/reload builds");
                None
            }
            Err(e) => {
                tracing::error!(
                    rescan_s = rescan.as_secs_f64(),
                    "cannot watch the folders ({e}); changes are picked up by the rescan only"
                );
                None
            }
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name("nudge-reload".into())
            .spawn(move || {
                // The watcher lives as long as the thread.
                let _watcher = watcher;
                let mut changed: BTreeSet<String> = BTreeSet::new();
                let mut first = Instant::now();
                let mut quiet_at = Instant::now();
                let mut last_scan = Instant::now();
                let tick = Duration::from_millis(50).min(debounce.max(Duration::from_millis(1)));
                while !stop.load(Ordering::Acquire) {
                    match rx.recv_timeout(tick) {
                        Ok(Ok(ev)) => {
                            use notify::event::AccessKind;
                            if matches!(
                                ev.kind,
                                notify::EventKind::Access(AccessKind::Open(_) | AccessKind::Read)
                            ) {
                                continue;
                            }
                            if changed.is_empty() {
                                first = Instant::now();
                            }
                            for p in ev.paths {
                                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                                changed.insert(name.unwrap_or_else(|| p.display().to_string()));
                            }
                            quiet_at = Instant::now() + debounce;
                        }
                        Ok(Err(e)) => tracing::warn!("file watch: {e}"),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        // No watcher: the rescan alone.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(tick)
                        }
                    }
                    let now = Instant::now();
                    // A folder written to without pause still gets built,
                    // at most every 20 debounce periods.
                    let due = !changed.is_empty()
                        && (now >= quiet_at || now.duration_since(first) >= debounce * 20);
                    if due {
                        let mut names: Vec<&str> =
                            changed.iter().map(String::as_str).take(10).collect();
                        if changed.len() > 10 {
                            names.push("…");
                        }
                        let cause = format!("changed: {}", names.join(", "));
                        me.reload(&cause, false);
                        changed.clear();
                        last_scan = Instant::now();
                    } else if !rescan.is_zero() && now.duration_since(last_scan) >= rescan {
                        last_scan = now;
                        me.reload("rescan", false);
                    }
                }
            })
            .map_err(|e| ReloadError::Watch {
                path: self.sources.rules.clone(),
                message: e.to_string(),
            })
    }
}

fn record(
    number: u64,
    cause: &str,
    snap: &Snapshot,
    gen: Option<&Generation>,
    errors: Vec<String>,
    build_ms: f64,
) -> GenerationRecord {
    let plugins = gen.map_or_else(Vec::new, |g| {
        g.plugins
            .iter()
            .map(|p| PluginRecord {
                name: p.name.clone(),
                version: p.version.clone(),
                kind: p.kind.name().into(),
                sha256: p.hash.clone(),
                path: p.source.clone(),
            })
            .collect()
    });
    let campaigns = gen.map_or_else(Vec::new, |g| {
        g.rules.campaigns.iter().map(|c| c.id.clone()).collect()
    });
    GenerationRecord {
        number,
        status: if gen.is_some() {
            Status::Ready
        } else {
            Status::Rejected
        },
        created_at: format_ts(now_ms()),
        cause: cause.to_owned(),
        plugins,
        campaigns,
        files: snap.files.iter().map(|f| f.record.clone()).collect(),
        errors,
        build_ms,
        activated_at: None,
        activated_by: None,
        activation: 0,
        fingerprint: snap.fingerprint.clone(),
    }
}

/// Loads one generation from the folders, without a reloader: `nudge
/// replay`, `nudge rules check`, `nudge plugin test`.
pub fn load_once(
    runtime: &Runtime,
    number: u64,
    sources: &Sources,
) -> Result<Generation, Vec<String>> {
    let snap = Snapshot::read(sources);
    build(runtime, sources, &snap, number, &mut HashMap::new())
}
