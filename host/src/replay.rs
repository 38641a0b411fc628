//! `nudge replay`: a file of events through a worker on an event-time clock,
//! writing the decisions and the report.
//!
//! A reader thread parses lines while the worker decides, so the two cores
//! share the work; lines reach the worker in file order, once admitted
//! ([`crate::intake`]: text, the clock, duplicates).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Event;
use crate::intake::{self, Admitted, Clock, Dedupe, Parsed};
use crate::measure::{self, Decided, Measure, Measurer};
use crate::plugins::{Limits, PluginError, Runtime};
use crate::reload::{load_once, Sources};
use crate::report::{self, Row};
use crate::spill;
use crate::store::{shard_of, Store, StoreError};
use crate::worker::{Stats, Worker, WorkerError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The plugins and rules do not validate together (each error names
    /// its file, line, field or plugin).
    #[error("the plugins and rules do not validate:\n  {}", .0.join("\n  "))]
    Generation(Vec<String>),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Spill(#[from] crate::spill::SpillError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the plugins come from.
#[derive(Clone, Debug)]
pub enum PluginSource {
    /// The example plugins built into the binary.
    Embedded,
    /// Every `*.wasm` in a folder.
    Dir(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub events: PathBuf,
    pub decisions: PathBuf,
    pub report: PathBuf,
    pub rules: PathBuf,
    pub plugins: PluginSource,
    /// Store folder; `None` uses a temporary folder removed afterwards.
    pub data: Option<PathBuf>,
    /// Compiled-plugin cache; `None` compiles every run.
    pub cache: Option<PathBuf>,
    /// Count and report invalid lines instead of stopping at the first.
    pub skip_invalid: bool,
    pub progress: bool,
    pub limits: Limits,
    /// Worker threads; customers are sharded over them.
    pub workers: usize,
    /// What the store's caches may hold.
    pub budget: crate::store::Budget,
    /// Replay the events in (timestamp, messageId) order instead of file
    /// order ([`crate::sort`]: an external sort, memory bounded).
    pub sort: bool,
    /// Where to write each campaign's measured result (JSON Lines,
    /// [`crate::measure::Measure`]); `None`: not written.
    pub measure: Option<PathBuf>,
    /// Keep the measurement's tallies in the store (what `nudge report
    /// --data` reads); off only to measure what keeping them costs.
    pub ledger: bool,
    /// A new store compresses what it writes (`--compress`).
    pub compress: bool,
}

/// What a replay did.
#[derive(Debug)]
pub struct Summary {
    pub events: u64,
    pub skipped: u64,
    /// Events dropped for a `messageId` already seen within the window.
    pub duplicates: u64,
    /// The first invalid lines skipped: (line, problem).
    pub skipped_lines: Vec<(usize, String)>,
    pub decisions: u64,
    pub elapsed: Duration,
    pub stats: Stats,
    pub report: Vec<Row>,
    /// Each campaign's result as of the last event of the input.
    pub measures: Vec<Measure>,
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The one line printed at the end.
    pub fn line(&self) -> String {
        let faults: u64 = self.stats.faults.values().sum();
        format!(
            "replayed {} events ({} skipped, {} duplicates), {} timers fired, {} decisions, {} plugin faults, {} rule errors in {:.2} s: {:.0} events/s",
            self.events,
            self.skipped,
            self.duplicates,
            self.stats.timers_fired,
            self.decisions,
            faults,
            self.stats.rule_errors,
            self.elapsed.as_secs_f64(),
            self.events_per_sec()
        )
    }
}

const CHUNK: usize = 1024;

/// How long a `messageId` is remembered, in event time: the live server's
/// default `ingest.dedupe_window`.
const DEDUPE_WINDOW_MS: i64 = 7 * 86_400_000;

/// Committed keys held in memory before they are written to sled.
const PERSIST_KEYS: usize = 250_000;

/// Runs `lines` (a reader that calls back with every line) and sends what
/// it yields to `tx` in chunks of [`CHUNK`], then its error if it fails.
/// Stops the reader once the receiver has gone.
fn feed(
    path: PathBuf,
    tx: mpsc::SyncSender<Result<Vec<Parsed>, ReplayError>>,
    lines: impl FnOnce(&mut dyn FnMut(Parsed) -> bool) -> std::io::Result<()>,
) {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut open = true;
    let read = lines(&mut |p| {
        chunk.push(p);
        if chunk.len() == CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            open = tx.send(Ok(full)).is_ok();
        }
        open
    });
    match read {
        Err(source) => {
            let _ = tx.send(Err(ReplayError::Io { path, source }));
        }
        Ok(()) if open && !chunk.is_empty() => {
            let _ = tx.send(Ok(chunk));
        }
        Ok(()) => {}
    }
}

/// Replays `opts.events` and writes the decisions and the report.
///
/// Customers are sharded over `opts.workers` worker threads. Every decision
/// depends only on its own customer's events, timers and history, and each
/// worker sees its customers' events in file order with their due timers
/// fired first, so the outputs are those of one worker, whatever the count.
pub fn run(opts: &Options) -> Result<Summary, ReplayError> {
    let runtime = Arc::new(Runtime::new(opts.limits.clone(), opts.cache.clone())?);
    let sources = Sources {
        plugins: opts.plugins.clone(),
        rules: opts.rules.clone(),
        grants: BTreeMap::new(),
    };
    let gen = Arc::new(load_once(&runtime, 1, &sources).map_err(ReplayError::Generation)?);
    let temp;
    let data_dir = match &opts.data {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("nudge-replay-")
                .tempdir()
                .map_err(io(Path::new("temporary folder")))?;
            temp.path().to_owned()
        }
    };
    let shards = opts.workers.max(1);
    let store = Store::open_compressed(&data_dir, shards, opts.budget, opts.compress)?;

    let size = std::fs::metadata(&opts.events)
        .map_err(io(&opts.events))?
        .len();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(size)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );

    // Decisions (and with `--sort`, the input) go to sorted runs on the
    // output's disk (not in memory, not a small /tmp), merged at the end.
    let out_dir = opts
        .decisions
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let spill_dir = tempfile::Builder::new()
        .prefix(".nudge-decisions-")
        .tempdir_in(out_dir)
        .map_err(io(out_dir))?;

    let (tx, rx) = mpsc::sync_channel(8);
    let path = opts.events.clone();
    let sort_dir = opts.sort.then(|| spill_dir.path().to_owned());
    let reader = std::thread::Builder::new()
        .name("nudge-replay-reader".into())
        .spawn(move || {
            let file = path.clone();
            feed(path, tx, |each| match sort_dir {
                Some(dir) => crate::sort::sorted(&file, &dir, crate::sort::RUN_BYTES, each),
                None => intake::each_line(&file, |n, raw, p| each((n, raw.len() as u64, p))),
            })
        })
        .map_err(io(Path::new("reader thread")))?;

    type WorkerResult = Result<(spill::Runs, Stats), ReplayError>;
    let mut senders = Vec::with_capacity(shards);
    let mut workers: Vec<std::thread::JoinHandle<WorkerResult>> = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (wtx, wrx) = mpsc::sync_channel::<Vec<Event>>(8);
        let mut worker = Worker::new(store.clone(), runtime.clone(), shard)?;
        if !opts.ledger {
            worker.ledger = None;
        }
        let gen = gen.clone();
        let mut spilled = spill::Writer::new(spill_dir.path(), shard, spill::RUN_BYTES);
        let handle = std::thread::Builder::new()
            .name(format!("nudge-worker-{shard}"))
            .spawn(move || {
                let mut out = Vec::new();
                for chunk in wrx {
                    for ev in chunk {
                        worker.handle(&gen, &ev, &mut out)?;
                        for d in out.drain(..) {
                            spilled.push(d)?;
                        }
                    }
                }
                Ok((spilled.finish(), worker.stats))
            })
            .map_err(io(Path::new("worker thread")))?;
        senders.push(wtx);
        workers.push(handle);
    }

    // Group commit: whole events reach sled together, and a key changed by
    // many events in between is written once. A thread of its own, so the
    // workers never wait for the disk.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let persister = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::Builder::new()
            .name("nudge-persist".into())
            .spawn(move || -> Result<(), StoreError> {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if store.pending_len() >= PERSIST_KEYS
                        || store.pending_bytes() >= store.budget().unpersisted()
                    {
                        store.persist()?;
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Ok(())
            })
            .map_err(io(Path::new("persist thread")))?
    };

    let start = Instant::now();
    let mut skipped = 0u64;
    let mut skipped_lines = Vec::new();
    let mut duplicates = 0u64;
    // The measurement's as_of: the time of the last event of the input.
    let mut as_of = i64::MIN;
    let mut clock = Clock::default();
    let mut dedupe = Dedupe::spilling(DEDUPE_WINDOW_MS, opts.budget.ids(), spill_dir.path());
    let mut admitted = Vec::with_capacity(CHUNK);
    let mut result = Ok(());
    let mut input_done = false;
    'chunks: while !input_done {
        let chunk = match rx.recv() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                result = Err(e);
                break;
            }
            // The end of the input: the event still held is settled.
            Err(_) => {
                input_done = true;
                Vec::new()
            }
        };
        let mut bytes = 0;
        let mut per_shard: Vec<Vec<Event>> = (0..shards)
            .map(|_| Vec::with_capacity(CHUNK / shards + 16))
            .collect();
        admitted.clear();
        for (line, len, parsed) in chunk {
            bytes += len;
            match parsed {
                Ok(ev) => match dedupe.first(&ev.message_id, ev.ts) {
                    Ok(true) => clock.offer(line, ev, &mut admitted),
                    Ok(false) => duplicates += 1,
                    Err(source) => {
                        result = Err(ReplayError::Io {
                            path: spill_dir.path().to_owned(),
                            source,
                        });
                        break 'chunks;
                    }
                },
                Err(message) => admitted.push(Admitted::Refused(line, message)),
            }
        }
        if input_done {
            clock.finish(&mut admitted);
        }
        for a in admitted.drain(..) {
            match a {
                Admitted::Event(ev) => {
                    as_of = as_of.max(ev.ts);
                    per_shard[shard_of(&ev.customer, shards)].push(ev)
                }
                Admitted::Refused(line, message) if opts.skip_invalid => {
                    skipped += 1;
                    tracing::warn!(line, "skipped: {message}");
                    if skipped_lines.len() < 100 {
                        skipped_lines.push((line, message));
                    }
                }
                Admitted::Refused(line, message) => {
                    result = Err(ReplayError::Invalid {
                        path: opts.events.clone(),
                        line,
                        message,
                    });
                    // Events before the bad line are still decided.
                    for (tx, evs) in senders.iter().zip(per_shard) {
                        let _ = tx.send(evs);
                    }
                    break 'chunks;
                }
            }
        }
        for (tx, evs) in senders.iter().zip(per_shard) {
            // A worker that stopped reports its error when joined below.
            if !evs.is_empty() && tx.send(evs).is_err() {
                break 'chunks;
            }
        }
        bar.inc(bytes);
    }
    drop(senders);
    // On an early stop the reader sees the closed channel and ends (it
    // would block for ever on a full one still open).
    drop(rx);
    let _ = reader.join();
    let mut runs = Vec::new();
    let mut stats = Stats::default();
    for w in workers {
        match w.join() {
            Ok(Ok((d, s))) => {
                runs.push(d);
                stats.merge(s);
            }
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(_) => {
                if result.is_ok() {
                    result = Err(ReplayError::Io {
                        path: opts.events.clone(),
                        source: std::io::Error::other("a worker thread panicked"),
                    });
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    match persister.join() {
        Ok(r) => r?,
        Err(_) => {
            return Err(ReplayError::Io {
                path: data_dir,
                source: std::io::Error::other("the persist thread panicked"),
            })
        }
    }
    result?;
    bar.finish_and_clear();
    store.flush()?;
    let elapsed = start.elapsed();

    // Conversions come back from the store in the decisions' own order
    // (time, customer, campaign), so they join the merge in one pass and
    // none is held in memory.
    let mut join = measure::ConversionJoin::new(store.conversions());
    let mut join_error = None;
    let mut measurer = Measurer::new(&gen.rules, as_of, measure::Settings::default());
    for (campaign, [fired, qualified]) in &stats.funnel {
        measurer.add_funnel(campaign, *fired, *qualified);
    }
    let mut tally = report::Tally::new(&gen.rules);
    let mut decisions = 0u64;
    let file = std::fs::File::create(&opts.decisions).map_err(io(&opts.decisions))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut written = Ok(());
    spill::merge(runs, |d| {
        decisions += 1;
        let conversion = match join.find(d.ts, &d.customer, &d.campaign) {
            Ok(c) => c,
            Err(e) => {
                join_error.get_or_insert(e);
                None
            }
        };
        tally.add(d, conversion.is_some());
        measurer.add(&Decided {
            ts: d.ts,
            customer: &d.customer,
            campaign: &d.campaign,
            outcome: d.outcome,
            conversion,
        });
        // An output error stops writing; it is reported after the merge.
        if written.is_ok() {
            written = w.write_all(&d.to_json()).and_then(|()| w.write_all(b"\n"));
        }
        Ok(())
    })?;
    if let Some(e) = join_error {
        return Err(e.into());
    }
    written
        .and_then(|()| w.flush())
        .map_err(io(&opts.decisions))?;
    let rows = tally.rows();
    write_file(&opts.report, report::to_jsonl(&rows).as_bytes())?;
    let measures = measurer.rows();
    if let Some(path) = &opts.measure {
        write_file(path, measure::to_jsonl(&measures).as_bytes())?;
    }
    Ok(Summary {
        events: stats.events,
        skipped,
        duplicates,
        skipped_lines,
        decisions,
        elapsed,
        stats,
        report: rows,
        measures,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReplayError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    Ok(())
}
