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
use crate::plugins::{hex_sha256, Plugin, PluginKind, Runtime};
use crate::replay::PluginSource;
use crate::rules::{rule_files, RuleSet};
use crate::store::{Store, StoreError};

const RECORD_PREFIX: &str = "generation/";
const BLOB_PREFIX: &str = "blob/";

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
    /// Over every file's path and hash: equal fingerprints, equal inputs.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("generation {number} was rejected: {}", errors.join("; "))]
    Rejected { number: u64, errors: Vec<String> },
    #[error("no generation {0}")]
    Unknown(u64),
    #[error("generation {0} is neither kept nor archived (run without a store?)")]
    Unavailable(u64),
    #[error("no earlier good generation to roll back to")]
    NothingToRollBack,
    #[error("watching {path}: {message}")]
    Watch { path: PathBuf, message: String },
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

/// `uid` → user name, from `/etc/passwd` (the plain reading; no NSS).
#[cfg(unix)]
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id = f.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn file_meta(path: &Path) -> (Option<String>, Option<String>) {
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
        Some(user_name(meta.uid()))
    };
    #[cfg(not(unix))]
    let owner = None;
    (modified, owner)
}

impl SourceFile {
    fn read(role: Role, path: PathBuf) -> SourceFile {
        let bytes =
            std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()));
        let (modified, owner) = file_meta(&path);
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
    fn finish(files: Vec<SourceFile>, errors: Vec<String>) -> Snapshot {
        let mut fp = String::new();
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
        match &sources.plugins {
            PluginSource::Embedded => {
                for (name, bytes, manifest) in crate::embedded::EMBEDDED {
                    let path = PathBuf::from(format!("embedded:{name}"));
                    files.push(SourceFile::new(
                        Role::Manifest,
                        path.join("nudge-plugin.toml"),
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
                        let manifest = w.with_extension("toml");
                        if manifest.is_file() {
                            files.push(SourceFile::read(Role::Manifest, manifest));
                        }
                        files.push(SourceFile::read(Role::Plugin, w));
                    }
                }
                Err(e) => errors.push(format!(
                    "{}: cannot read the plugins folder: {e}",
                    dir.display()
                )),
            },
        }
        match rule_files(&sources.rules) {
            Ok(rules) => files.extend(rules.into_iter().map(|r| SourceFile::read(Role::Rule, r))),
            Err(e) => errors.extend(e.0.iter().map(ToString::to_string)),
        }
        Snapshot::finish(files, errors)
    }

    /// A generation's files as archived in the store.
    fn archived(store: &Store, record: &GenerationRecord) -> Result<Snapshot, ReloadError> {
        let mut files = Vec::new();
        for f in &record.files {
            let Some(bytes) = store.meta(&format!("{BLOB_PREFIX}{}", f.sha256))? else {
                return Err(ReloadError::Unavailable(record.number));
            };
            files.push(SourceFile {
                path: PathBuf::from(&f.path),
                bytes: Ok(bytes),
                record: f.clone(),
            });
        }
        Ok(Snapshot::finish(files, Vec::new()))
    }
}

fn kind_name(k: &PluginKind) -> &'static str {
    match k {
        PluginKind::Trigger(_) => "trigger",
        PluginKind::Response => "response",
        PluginKind::Channel => "channel",
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
        let manifest_path = match &sources.plugins {
            PluginSource::Embedded => f.path.join("nudge-plugin.toml"),
            PluginSource::Dir(_) => f.path.with_extension("toml"),
        };
        let manifest = match manifests.get(manifest_path.as_path()) {
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
    /// Compiled components by content hash.
    loaded: HashMap<String, Plugin>,
    next: u64,
    active: u64,
    /// The fingerprint of the last build, good or not: the same files are
    /// not built twice in a row.
    last_fingerprint: String,
}

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
    state: Mutex<State>,
}

impl Reloader {
    /// Builds the first generation from the files. If they do not validate
    /// and the store has an archived generation that was active last, that
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
        let last_active = records
            .values()
            .filter(|r| r.status == Status::Archived)
            .max_by_key(|r| (r.activated_at.clone(), r.number))
            .map(|r| r.number);
        let snap = Snapshot::read(&sources);
        let mut loaded = HashMap::new();
        let started = Instant::now();
        // The files of the generation active at the last stop keep its
        // number: a restart is not a new generation.
        let same = last_active.filter(|n| records[n].fingerprint == snap.fingerprint);
        let first = build(&runtime, &sources, &snap, same.unwrap_or(next), &mut loaded);
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        let (gen, rejected) = match first {
            Ok(g) => (g, None),
            Err(errors) => {
                let fallback = match (&store, last_active) {
                    (Some(s), Some(n)) => Snapshot::archived(s, &records[&n])
                        .ok()
                        .and_then(|snap| build(&runtime, &sources, &snap, n, &mut loaded).ok()),
                    _ => None,
                };
                match fallback {
                    Some(g) => {
                        tracing::error!(
                            generation = g.number,
                            "the published files do not validate; starting with the last good generation: {}",
                            errors.join("; ")
                        );
                        (g, Some(errors))
                    }
                    None => {
                        return Err(ReloadError::Rejected {
                            number: next,
                            errors,
                        })
                    }
                }
            }
        };
        let current = Arc::new(Current::new(gen));
        let gen = current.load();
        // Whether this start used up a number (a new or a rejected build).
        let numbered = same.is_none() || rejected.is_some();
        let reloader = Arc::new(Reloader {
            runtime,
            sources,
            current,
            controls,
            store,
            metrics,
            keep: keep.max(1),
            history: history.max(1),
            state: Mutex::new(State {
                records,
                kept: BTreeMap::new(),
                loaded,
                next: if numbered { next + 1 } else { next },
                active: gen.number,
                last_fingerprint: snap.fingerprint.clone(),
            }),
        });
        {
            let mut st = reloader.lock();
            if let Some(errors) = rejected {
                let r = record(next, "start", &snap, None, errors, build_ms);
                reloader.save(&r);
                st.records.insert(next, r);
            } else if same.is_none() {
                let r = record(next, "start", &snap, Some(&gen), Vec::new(), build_ms);
                reloader.archive(&snap);
                st.records.insert(next, r);
            }
            reloader.activated(&mut st, gen, "start");
            reloader.prune(&mut st);
        }
        Ok(reloader)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Makes `gen` current and records it (with the state lock held).
    fn activated(&self, st: &mut State, gen: Arc<Generation>, by: &str) {
        let number = gen.number;
        self.current.store(gen.clone());
        self.controls.on_generation(&gen);
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
        let keep: Vec<String> = st
            .loaded
            .keys()
            .filter(|h| used.contains(h.as_str()))
            .cloned()
            .collect();
        st.loaded.retain(|h, _| keep.contains(h));
        if let Some(r) = st.records.get_mut(&number) {
            r.status = Status::Active;
            r.activated_at = Some(format_ts(now_ms()));
            r.activated_by = Some(by.to_owned());
            let r = r.clone();
            self.save(&r);
        }
        if let Some(m) = &self.metrics {
            m.generation_active.set(number as i64);
        }
        tracing::info!(generation = number, by, "generation active");
    }

    /// Deletes the oldest records past `history` (never the active or a
    /// kept one), then the archived files no remaining good record uses.
    fn prune(&self, st: &mut State) {
        let excess = st.records.len().saturating_sub(self.history);
        if excess == 0 {
            return;
        }
        let victims: Vec<u64> = st
            .records
            .keys()
            .copied()
            .filter(|n| *n != st.active && !st.kept.contains_key(n))
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

    /// Reads the folders and, if anything changed since the last build,
    /// builds, validates and activates a new generation.
    pub fn reload(&self, cause: &str) -> Outcome {
        let started = Instant::now();
        let snap = Snapshot::read(&self.sources);
        let mut st = self.lock();
        if snap.fingerprint == st.last_fingerprint {
            if let Some(m) = &self.metrics {
                m.reload("unchanged", started.elapsed());
            }
            return Outcome::Unchanged;
        }
        st.last_fingerprint = snap.fingerprint.clone();
        let number = st.next;
        st.next += 1;
        let built = build(&self.runtime, &self.sources, &snap, number, &mut st.loaded);
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        match built {
            Ok(gen) => {
                let r = record(number, cause, &snap, Some(&gen), Vec::new(), build_ms);
                self.archive(&snap);
                st.records.insert(number, r);
                self.activated(&mut st, Arc::new(gen), cause);
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
        let mut st = self.lock();
        let record = st
            .records
            .get(&number)
            .cloned()
            .ok_or(ReloadError::Unknown(number))?;
        if record.status == Status::Rejected {
            return Err(ReloadError::Rejected {
                number,
                errors: record.errors,
            });
        }
        if st.active != number {
            let gen = match st.kept.get(&number) {
                Some(g) => g.clone(),
                None => {
                    let store = self
                        .store
                        .as_ref()
                        .ok_or(ReloadError::Unavailable(number))?;
                    let snap = Snapshot::archived(store, &record)?;
                    let gen = build(&self.runtime, &self.sources, &snap, number, &mut st.loaded)
                        .map_err(|errors| ReloadError::Rejected { number, errors })?;
                    Arc::new(gen)
                }
            };
            self.activated(&mut st, gen, by);
        }
        st.records
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
                .max_by_key(|r| (r.activated_at.clone(), r.number))
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
    /// notices are unreliable (NFS, some container mounts).
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
        rescan: Duration,
        stop: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<()>, ReloadError> {
        use notify::{RecursiveMode, Watcher};
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |res| {
            let _ = tx.send(res);
        })
        .map_err(|e| ReloadError::Watch {
            path: self.sources.rules.clone(),
            message: e.to_string(),
        })?;
        let mut dirs = vec![self.sources.rules.clone()];
        if let PluginSource::Dir(d) = &self.sources.plugins {
            dirs.push(d.clone());
        }
        for d in &dirs {
            watcher
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|e| ReloadError::Watch {
                    path: d.clone(),
                    message: e.to_string(),
                })?;
        }
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
                while !stop.load(Ordering::Acquire) {
                    match rx.recv_timeout(
                        Duration::from_millis(50).min(debounce.max(Duration::from_millis(1))),
                    ) {
                        Ok(Ok(ev)) => {
                            if matches!(
                                ev.kind,
                                notify::EventKind::Access(
                                    notify::event::AccessKind::Open(_)
                                        | notify::event::AccessKind::Read
                                )
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
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
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
                        me.reload(&cause);
                        changed.clear();
                        last_scan = Instant::now();
                    } else if !rescan.is_zero() && now.duration_since(last_scan) >= rescan {
                        last_scan = now;
                        me.reload("rescan");
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
                kind: kind_name(&p.kind).into(),
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
    let gen = build(runtime, sources, &snap, number, &mut HashMap::new())?;
    for name in sources.grants.keys() {
        if gen.plugin(name).is_none() {
            tracing::warn!(plugin = %name, "config grants capabilities to a plugin that is not loaded");
        }
    }
    Ok(gen)
}
