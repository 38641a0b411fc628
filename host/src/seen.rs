//! Message ids that replay's de-duplication window no longer holds in
//! memory: sorted runs on disk behind one Bloom filter.
//!
//! Each spill writes the ids it is handed as a run file sorted by hash,
//! with the first hash of every block kept in memory (16 bytes per 256
//! ids). A lookup that the filter rules out (all but about one in a
//! hundred new ids, at the filter's designed load) touches no file; one it
//! lets through reads one block of each run. Memory is the filter's fixed
//! size plus the sparse indexes, about 0.07 bytes an id: a window of 100M
//! ids costs ~7 MiB beyond the filter. A sled tree was tried first: its
//! page cache does not bound what random inserts keep resident (+600 MiB
//! of RSS on 13M ids).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Ids per block of a run file.
const BLOCK: usize = 256;
/// Bytes per id in a run file: hash, then time.
const ENTRY: usize = 24;
/// Filter probes per id.
const PROBES: u32 = 4;

pub struct Spilled {
    dir: PathBuf,
    /// Bloom filter bits; its length is a power of two.
    bloom: Vec<u64>,
    runs: Vec<Run>,
}

struct Run {
    path: PathBuf,
    file: File,
    /// First hash of each block.
    index: Vec<u128>,
    len: usize,
}

impl Spilled {
    /// Runs go in `dir` (which must exist); the filter takes about
    /// `filter_bytes`.
    pub fn new(dir: &Path, filter_bytes: usize) -> Spilled {
        let words = (filter_bytes / 8).max(1024).next_power_of_two();
        Spilled {
            dir: dir.to_owned(),
            bloom: vec![0; words],
            runs: Vec::new(),
        }
    }

    /// The filter's (word, bit mask) for `hash`, of a filter of `words`.
    fn probes(words: usize, hash: u128) -> impl Iterator<Item = (usize, u64)> {
        let bits = (words * 64) as u64;
        // The hash is uniform already: four 32-bit slices of it, mixed
        // with the high half, are the probe positions.
        let (lo, hi) = (hash as u64, (hash >> 64) as u64);
        (0..PROBES).map(move |i| {
            let bit = lo.wrapping_add(u64::from(i).wrapping_mul(hi | 1)) & (bits - 1);
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    /// Writes `ids` (hash, time) as a run.
    pub fn add(&mut self, mut ids: Vec<(u128, i64)>) -> std::io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        ids.sort_unstable();
        let path = self.dir.join(format!("ids-{}", self.runs.len()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        let mut index = Vec::with_capacity(ids.len() / BLOCK + 1);
        for (i, (h, t)) in ids.iter().enumerate() {
            if i % BLOCK == 0 {
                index.push(*h);
            }
            w.write_all(&h.to_le_bytes())?;
            w.write_all(&t.to_le_bytes())?;
        }
        w.flush()?;
        drop(w);
        for (h, _) in &ids {
            for (word, mask) in Spilled::probes(self.bloom.len(), *h) {
                self.bloom[word] |= mask;
            }
        }
        self.runs.push(Run {
            path,
            file,
            index,
            len: ids.len(),
        });
        Ok(())
    }

    /// The latest time `hash` was spilled with, if it was.
    pub fn get(&self, hash: u128) -> std::io::Result<Option<i64>> {
        if !Spilled::probes(self.bloom.len(), hash).all(|(w, m)| self.bloom[w] & m != 0) {
            return Ok(None);
        }
        // Newest run first: an id spilled twice (seen again after its
        // window passed) has its latest time there.
        for run in self.runs.iter().rev() {
            let block = run.index.partition_point(|first| *first <= hash);
            let Some(block) = block.checked_sub(1) else {
                continue;
            };
            let start = block * BLOCK;
            let n = BLOCK.min(run.len - start);
            let mut buf = vec![0u8; n * ENTRY];
            run.file.read_exact_at(&mut buf, (start * ENTRY) as u64)?;
            let found = buf.chunks_exact(ENTRY).find_map(|e| {
                let h = u128::from_le_bytes(e[..16].try_into().ok()?);
                let t = i64::from_le_bytes(e[16..].try_into().ok()?);
                (h == hash).then_some(t)
            });
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }
}

impl Drop for Spilled {
    fn drop(&mut self) {
        for r in &self.runs {
            let _ = std::fs::remove_file(&r.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_spilled_id_and_its_latest_time_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spilled::new(dir.path(), 0);
        let hash = |n: u64| u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        s.add((0..1000).map(|n| (hash(n), n as i64)).collect())
            .unwrap();
        s.add((500..1500).map(|n| (hash(n), 10_000 + n as i64)).collect())
            .unwrap();
        for n in 0..500 {
            assert_eq!(s.get(hash(n)).unwrap(), Some(n as i64));
        }
        for n in 500..1500 {
            assert_eq!(s.get(hash(n)).unwrap(), Some(10_000 + n as i64));
        }
        for n in 1500..3000 {
            assert_eq!(s.get(hash(n)).unwrap(), None);
        }
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
