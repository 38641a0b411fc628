//! Replay's decisions, sorted by (time, customer, campaign) in bounded
//! memory: an external merge sort.
//!
//! Each worker keeps its decisions in a buffer; a full buffer is sorted and
//! written as a run file. At the end the runs of every worker are merged
//! into the output order, so a replay of ten million events holds a few
//! megabytes of decisions, not all of them. The sort is stable: decisions
//! with the same key (one customer, so one worker) keep the order their
//! worker made them in, exactly as an in-memory stable sort would.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::decide::Outcome;
use crate::worker::Decision;

/// Bytes of decisions a worker buffers before it writes a run.
pub const RUN_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
#[error("decision spill {path}: {source}")]
pub struct SpillError {
    path: PathBuf,
    source: std::io::Error,
}

fn err(path: &Path) -> impl Fn(std::io::Error) -> SpillError + '_ {
    move |source| SpillError {
        path: path.to_owned(),
        source,
    }
}

fn cost(d: &Decision) -> usize {
    96 + d.customer.len() + d.campaign.len() + d.channel.len() + d.trigger.len()
}

fn key(d: &Decision) -> (i64, &[u8], &[u8]) {
    (d.ts, d.customer.as_bytes(), d.campaign.as_bytes())
}

/// One worker's side: buffers decisions, writes sorted runs.
pub struct Writer {
    dir: PathBuf,
    shard: usize,
    buf: Vec<Decision>,
    bytes: usize,
    limit: usize,
    runs: Vec<PathBuf>,
}

/// What a worker spilled: run files in the order written, then what was
/// still buffered (sorted).
pub struct Runs {
    files: Vec<PathBuf>,
    tail: Vec<Decision>,
}

impl Writer {
    /// A writer for `shard`'s runs in `dir` (which must exist), buffering
    /// up to `limit` bytes.
    pub fn new(dir: &Path, shard: usize, limit: usize) -> Writer {
        Writer {
            dir: dir.to_owned(),
            shard,
            buf: Vec::new(),
            bytes: 0,
            limit,
            runs: Vec::new(),
        }
    }

    pub fn push(&mut self, d: Decision) -> Result<(), SpillError> {
        self.bytes += cost(&d);
        self.buf.push(d);
        if self.bytes >= self.limit {
            self.write_run()?;
        }
        Ok(())
    }

    fn write_run(&mut self) -> Result<(), SpillError> {
        // Stable: equal keys keep the worker's order.
        self.buf.sort_by(|a, b| key(a).cmp(&key(b)));
        let path = self
            .dir
            .join(format!("run-{}-{}", self.shard, self.runs.len()));
        let file = File::create(&path).map_err(err(&path))?;
        let mut w = BufWriter::new(file);
        for d in self.buf.drain(..) {
            encode(&mut w, &d).map_err(err(&path))?;
        }
        w.flush().map_err(err(&path))?;
        self.bytes = 0;
        self.runs.push(path);
        Ok(())
    }

    pub fn finish(mut self) -> Runs {
        self.buf.sort_by(|a, b| key(a).cmp(&key(b)));
        Runs {
            files: self.runs,
            tail: self.buf,
        }
    }
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u32).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn encode(w: &mut impl Write, d: &Decision) -> std::io::Result<()> {
    w.write_all(&d.ts.to_le_bytes())?;
    let outcome = Outcome::ALL
        .iter()
        .position(|o| *o == d.outcome)
        .unwrap_or(0);
    w.write_all(&[outcome as u8])?;
    for s in [&d.customer, &d.campaign, &d.channel, &d.trigger] {
        put_str(w, s)?;
    }
    Ok(())
}

fn get_str(r: &mut impl Read) -> std::io::Result<String> {
    let mut len = [0; 4];
    r.read_exact(&mut len)?;
    let mut b = vec![0; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(std::io::Error::other)
}

/// The next decision of a run file; `None` at its end.
fn decode(r: &mut impl Read) -> std::io::Result<Option<Decision>> {
    let mut ts = [0; 8];
    match r.read_exact(&mut ts) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let mut o = [0; 1];
    r.read_exact(&mut o)?;
    let outcome = *Outcome::ALL
        .get(usize::from(o[0]))
        .ok_or_else(|| std::io::Error::other("bad outcome"))?;
    Ok(Some(Decision {
        ts: i64::from_le_bytes(ts),
        outcome,
        customer: get_str(r)?,
        campaign: get_str(r)?,
        channel: get_str(r)?,
        trigger: get_str(r)?,
        // Replay's decisions are never late.
        late_ms: None,
    }))
}

/// A sorted source for [`kmerge`].
pub type Sorted<'a, T, E> = Box<dyn Iterator<Item = Result<T, E>> + 'a>;

/// Merges `sources`, each sorted by `key`, calling `each` with their items
/// in key order (equal keys: the earlier source first) until it returns
/// false. The k-way merge of every external sort here.
pub fn kmerge<T, K: Ord, E>(
    mut sources: Vec<Sorted<'_, T, E>>,
    key: impl Fn(&T) -> K,
    mut each: impl FnMut(T) -> Result<bool, E>,
) -> Result<(), E> {
    let mut heads: Vec<Option<T>> = Vec::with_capacity(sources.len());
    let mut heap = BinaryHeap::new();
    for (i, s) in sources.iter_mut().enumerate() {
        let head = s.next().transpose()?;
        if let Some(h) = &head {
            heap.push(Reverse((key(h), i)));
        }
        heads.push(head);
    }
    while let Some(Reverse((_, i))) = heap.pop() {
        if let Some(item) = heads[i].take() {
            if !each(item)? {
                return Ok(());
            }
        }
        let next = sources[i].next().transpose()?;
        if let Some(h) = &next {
            heap.push(Reverse((key(h), i)));
        }
        heads[i] = next;
    }
    Ok(())
}

/// Calls `each` with every decision of `runs` (one per worker, any
/// order) in (time, customer, campaign) order, and deletes the run files.
pub fn merge(
    runs: Vec<Runs>,
    mut each: impl FnMut(&Decision) -> Result<(), SpillError>,
) -> Result<(), SpillError> {
    let mut sources: Vec<Sorted<'_, Decision, SpillError>> = Vec::new();
    let mut files = Vec::new();
    let mut opened = Ok(());
    for r in runs {
        for path in r.files {
            files.push(path.clone());
            match File::open(&path) {
                Ok(f) => {
                    let mut f = BufReader::with_capacity(64 << 10, f);
                    sources.push(Box::new(std::iter::from_fn(move || {
                        decode(&mut f).map_err(err(&path)).transpose()
                    })));
                }
                Err(e) => opened = Err(err(&path)(e)),
            }
        }
        // A worker's runs, then its tail: ties keep the order it wrote.
        sources.push(Box::new(r.tail.into_iter().map(Ok)));
    }
    let merged = opened.and_then(|()| {
        kmerge(
            sources,
            |d| (d.ts, d.customer.clone(), d.campaign.clone()),
            |d| each(&d).map(|()| true),
        )
    });
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decision(ts: i64, customer: u8, campaign: u8, n: usize) -> Decision {
        Decision {
            ts,
            customer: format!("c{customer}"),
            campaign: format!("k{campaign}"),
            outcome: Outcome::ALL[n % 6],
            channel: "email".into(),
            trigger: format!("m{n}"),
            late_ms: None,
        }
    }

    proptest! {
        // Against a stable in-memory sort of the same decisions, with
        // runs from a few bytes (one decision per file) to all in memory.
        #[test]
        fn merges_as_a_stable_sort_does(
            made in prop::collection::vec((0..4u8, 0..20i64, 0..5u8, 0..3u8), 0..200),
            limit in prop_oneof![Just(1usize), 100..2000usize, Just(usize::MAX)],
        ) {
            let dir = tempfile::tempdir().unwrap();
            let shards = 4;
            let mut writers: Vec<Writer> = (0..shards).map(|s| Writer::new(dir.path(), s, limit)).collect();
            let mut all = Vec::new();
            for (n, (shard, ts, customer, campaign)) in made.into_iter().enumerate() {
                // A customer belongs to one shard, as in replay.
                let customer = customer * 4 + shard;
                let d = decision(ts, customer, campaign, n);
                all.push(d.clone());
                writers[usize::from(shard)].push(d).unwrap();
            }
            all.sort_by(|a, b| key(a).cmp(&key(b)));
            let mut got = Vec::new();
            merge(writers.into_iter().map(Writer::finish).collect(), |d| {
                got.push(d.clone());
                Ok(())
            }).unwrap();
            prop_assert_eq!(got, all);
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "run files left");
        }
    }
}
