//! A reloader whose generations are shared (a cluster,
//! `cluster/generations.rs`): numbers come from the cluster, a good build
//! and an operator's activation are published before they take effect
//! here, and what another node published is adopted.

use std::sync::Arc;

use super::{GenerationRecord, Outcome, ReloadError, Reloader, Snapshot, Status, BLOB_PREFIX};

/// A generation's files: (sha256, bytes).
pub type Files = Vec<(String, Vec<u8>)>;

/// Where generations are shared: the cluster's numbers and its active
/// generation. Calls block (the reloader runs on blocking threads).
pub trait Sharing: Send + Sync {
    /// A number no build in the cluster has had, at least `at_least`.
    fn number(&self, at_least: u64) -> Result<u64, String>;
    /// The files (path, sha256) of the generation the cluster runs.
    fn active_files(&self) -> Result<Option<Vec<(String, String)>>, String>;
    /// Makes `record` the cluster's active generation, with its files.
    fn publish(&self, record: &GenerationRecord, files: Files, by: &str) -> Result<(), String>;
}

/// Files as (file name, hash), sorted: equal for the same files in folders
/// at different paths on different nodes.
pub(super) fn content<'a>(
    files: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = files
        .map(|(path, sha)| {
            let name = std::path::Path::new(path)
                .file_name()
                .map_or(path.to_owned(), |n| n.to_string_lossy().into_owned());
            (name, sha.to_owned())
        })
        .collect();
    out.sort();
    out
}

impl Reloader {
    /// Shares this reloader's generations from now on.
    pub fn share_with(&self, sharing: Arc<dyn Sharing>) {
        let _ = self.sharing.set(sharing);
    }

    /// The number the next local build would take.
    pub fn next_number(&self) -> u64 {
        self.lock().next
    }

    /// Where a build's number comes from: the cluster's when shared.
    /// `Err`: the cluster did not answer (nothing is built).
    pub(super) fn take_number(&self, snap: &Snapshot, force: bool) -> Result<Option<u64>, String> {
        let local = {
            let mut st = self.lock();
            let n = st.next;
            st.next += 1;
            n
        };
        let Some(sharing) = self.sharing.get() else {
            return Ok(Some(local));
        };
        if !force {
            // The same files as the cluster runs (copied to every node):
            // nothing to publish; the cluster's generation is adopted.
            if let Some(active) = sharing.active_files()? {
                let here = content(
                    snap.files
                        .iter()
                        .map(|f| (f.record.path.as_str(), f.record.sha256.as_str())),
                );
                let there = content(active.iter().map(|(p, s)| (p.as_str(), s.as_str())));
                if here == there && snap.errors.is_empty() {
                    return Ok(None);
                }
            }
        }
        let n = sharing.number(local)?;
        let mut st = self.lock();
        st.next = st.next.max(n + 1);
        Ok(Some(n))
    }

    /// A build could not be shared: nothing changes here, and the same
    /// files are built again at the next change or rescan.
    pub(super) fn unshared(&self, number: Option<u64>, e: String) -> Outcome {
        self.lock().last_fingerprint = String::new();
        tracing::error!(
            generation = number,
            "the cluster's generations are out of reach; the active generation keeps running (tried again at the next change or rescan): {e}"
        );
        if let Some(m) = &self.metrics {
            m.reload("unshared", std::time::Duration::ZERO);
        }
        Outcome::Unshared(e)
    }

    /// Publishes a generation about to be activated here, if shared.
    pub(super) fn share(
        &self,
        record: &GenerationRecord,
        files: Files,
        by: &str,
    ) -> Result<(), String> {
        match self.sharing.get() {
            Some(s) => s.publish(record, files, by),
            None => Ok(()),
        }
    }

    pub(super) fn is_shared(&self) -> bool {
        self.sharing.get().is_some()
    }

    /// A generation's files (hash, bytes) from the archive.
    pub(super) fn archived_files(&self, record: &GenerationRecord) -> Result<Files, ReloadError> {
        let store = self
            .store
            .as_ref()
            .ok_or(ReloadError::Unavailable(record.number))?;
        let mut out = Vec::new();
        for f in &record.files {
            let bytes = store
                .meta(&format!("{BLOB_PREFIX}{}", f.sha256))?
                .ok_or(ReloadError::Unavailable(record.number))?;
            out.push((f.sha256.clone(), bytes));
        }
        Ok(out)
    }

    /// The active generation's record and files (a new cluster's first
    /// node publishes them).
    pub fn active_with_files(&self) -> Result<(GenerationRecord, Files), ReloadError> {
        let record = {
            let st = self.lock();
            st.records
                .get(&st.active)
                .cloned()
                .ok_or(ReloadError::Unknown(st.active))?
        };
        let files = self.archived_files(&record)?;
        Ok((record, files))
    }

    /// Runs generation `record.number` as another node published it:
    /// fetches the files this node's archive lacks (`fetch`: hash →
    /// bytes), records it under the cluster's number (replacing a local
    /// record of that number from before the cluster), rebuilds and
    /// activates it.
    pub fn adopt(
        &self,
        mut record: GenerationRecord,
        by: &str,
        fetch: impl Fn(&str) -> Result<Vec<u8>, String>,
    ) -> Result<(), ReloadError> {
        let number = record.number;
        let store = self
            .store
            .as_ref()
            .ok_or(ReloadError::Unavailable(number))?;
        for f in &record.files {
            let key = format!("{BLOB_PREFIX}{}", f.sha256);
            if !store.has_meta(&key)? {
                let bytes = fetch(&f.sha256).map_err(ReloadError::Shared)?;
                store.put_meta(&key, &bytes)?;
            }
        }
        {
            let mut st = self.lock();
            st.next = st.next.max(number + 1);
            let same = st.records.get(&number).is_some_and(|r| {
                r.status != Status::Rejected
                    && content(r.files.iter().map(|f| (f.path.as_str(), f.sha256.as_str())))
                        == content(
                            record
                                .files
                                .iter()
                                .map(|f| (f.path.as_str(), f.sha256.as_str())),
                        )
            });
            if !same {
                if st.records.contains_key(&number) {
                    tracing::warn!(
                        generation = number,
                        "a local generation of this number, from before the cluster, is replaced by the cluster's"
                    );
                }
                st.kept.remove(&number);
                record.status = Status::Archived;
                record.activated_at = None;
                record.activated_by = None;
                record.activation = 0;
                self.save(&record);
                st.records.insert(number, record);
            }
        }
        self.activate_as(number, by, false, true).map(|_| ())
    }
}
