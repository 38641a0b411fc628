//! `nudge serve`: the live server. Wires ingest, the inbox, the workers,
//! the persister and delivery together, and takes them down in order.
//!
//! Threads: the HTTP server (tokio), one inbox committer, one worker per
//! shard (plugin calls are synchronous and CPU-bound), one persister (group
//! commit of the workers' changes) and one deliverer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Clock, Config};
use crate::controls::{Controls, QuarantinePolicy};
use crate::deliver::{self, Deliverer};
use crate::event::now_ms;
use crate::generation::Current;
use crate::inbox::{Groups, Inbox, Work};
use crate::metrics::Metrics;
use crate::plugins::Runtime;
use crate::reload::{Reloader, Sources};
use crate::reorder::{Policy, Reorder, Watermarks};
use crate::replay::PluginSource;
use crate::store::{shard_of, Store};
use crate::worker::Worker;

mod cluster;
mod work;
use work::work;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Reload(#[from] crate::reload::ReloadError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Plugin(#[from] crate::plugins::PluginError),
    #[error(transparent)]
    Deliver(#[from] deliver::DeliverError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::node::NodeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Io {
        what: what.to_owned(),
        source,
    }
}

/// How often the workers' committed changes are written and flushed. Longer
/// collapses more writes of the same keys; it also delays deliveries (which
/// wait for their decision to be on disk) and widens what a crash makes the
/// workers decide again (never what it loses: that is the inbox's job).
const PERSIST_EVERY: Duration = Duration::from_millis(50);

/// Most events a worker takes in one pass.
const BATCH: usize = 256;

/// How often remembered message ids are swept for expiry.
const DEDUPE_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Longest a worker sleeps with nothing to do (wall clock: then it checks
/// timers).
const IDLE: Duration = Duration::from_millis(200);

/// Everything the HTTP handlers reach.
pub struct Shared {
    pub cfg: Config,
    pub store: Store,
    pub inbox: Inbox,
    pub metrics: Arc<Metrics>,
    pub current: Arc<Current>,
    pub reloader: Arc<Reloader>,
    pub ids: crate::ingest::MessageIds,
    /// Each worker's event-time watermark (`server.late = "refuse"`).
    pub watermarks: Watermarks,
    pub deliver: std::sync::Mutex<Option<Sender<deliver::Input>>>,
    /// The dashboard's sessions and metric samples.
    pub ui: crate::ui::UiState,
    /// This server as a cluster node (`[cluster]`), else `None`.
    pub node: Option<Arc<crate::cluster::node::Node>>,
}

/// [`run_with`], telling no one when it is ready.
pub async fn run(
    cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with(cfg, listener, shutdown, |_| {}).await
}

/// Runs the server on `listener` until `shutdown` resolves, then drains:
/// requests in flight are answered, accepted events decided, their
/// changes flushed, and due deliveries attempted (up to
/// `server.shutdown_grace`).
///
/// `ready` is called with the address once start-up cannot fail any more
/// (store open, generation loaded, recovery done), just before serving.
pub async fn run_with(
    mut cfg: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    // Plain legacy tokens become named operator tokens once, here, rather
    // than on every request.
    cfg.api.token = cfg.api.all_tokens();
    cfg.api.tokens.clear();
    let workers = match cfg.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let runtime = Arc::new(Runtime::new(
        cfg.limits.to_limits(),
        Some(cfg.server.cache.clone()),
    )?);
    let source = match &cfg.server.plugins {
        Some(d) => PluginSource::Dir(d.clone()),
        None => PluginSource::Embedded,
    };
    let cluster = cfg.cluster.clone();
    // A cluster node's store has a timer queue per slot (each slot keeps
    // its own clock); a lone server's, one per worker.
    let store = Store::open_compressed(
        &cfg.server.data,
        cluster.as_ref().map_or(workers, |c| usize::from(c.slots)),
        crate::store::Budget::mib(cfg.store.memory_mib),
        cfg.store.compression,
    )?;
    let metrics = Arc::new(Metrics::new());
    let controls = Arc::new(Controls::new(
        QuarantinePolicy {
            faults: cfg.quarantine.faults,
            window: cfg.quarantine.window.0,
        },
        Some(store.clone()),
        Some(metrics.clone()),
    )?);
    let reloader = Reloader::start(
        runtime.clone(),
        Sources {
            plugins: source,
            rules: cfg.server.rules.clone(),
            grants: cfg.plugins.clone(),
        },
        controls.clone(),
        Some(store.clone()),
        Some(metrics.clone()),
        cfg.reload.keep,
        cfg.reload.history,
    )?;
    let current = reloader.current();
    {
        let gen = current.load();
        tracing::info!(
            generation = gen.number,
            plugins = gen.plugins.len(),
            campaigns = gen.rules.campaigns.len(),
            "generation loaded"
        );
    }
    let inflight = Arc::new(AtomicUsize::new(0));

    let recovered = match &cluster {
        None => crate::inbox::recover(&store)?,
        // A cluster node's events wait in the events stream, not here.
        Some(_) => crate::inbox::Recovered::default(),
    };
    let tenures = cluster
        .as_ref()
        .map(|c| Arc::new(crate::cluster::tenure::Tenures::new(c.slots, workers)));

    let watermarks = Watermarks::new(workers);

    // Workers.
    let mut senders = Vec::with_capacity(workers);
    let mut worker_threads = Vec::with_capacity(workers);
    for shard in 0..workers {
        let (tx, rx) = mpsc::channel::<Work>();
        let mut worker =
            Worker::new(store.clone(), runtime.clone(), shard).map_err(|e| ServeError::Io {
                what: "worker".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        worker.live = true;
        worker.mark_late = cfg.server.clock == Clock::Wall;
        worker.metrics = Some(metrics.clone());
        worker.controls = Some(controls.clone());
        let (current, inflight, metrics) = (current.clone(), inflight.clone(), metrics.clone());
        let marks = watermarks.clone();
        let clock = cfg.server.clock;
        let policy = Policy {
            clock,
            window: cfg.server.reorder_window(),
            // Under ingest's in-flight bound, so a full buffer releases
            // rather than ingest refusing.
            max_held: (cfg.ingest.max_inflight_events / (2 * workers)).max(1),
        };
        if let Some(tenures) = &tenures {
            worker.share_traits(workers);
            worker.dedupe = true;
            let tenures = tenures.clone();
            worker_threads.push(
                std::thread::Builder::new()
                    .name(format!("nudge-worker-{shard}"))
                    .spawn(move || {
                        work::work_slots(
                            worker, shard, rx, current, policy, tenures, inflight, metrics,
                        )
                    })
                    .map_err(io("worker thread"))?,
            );
            senders.push(tx);
            continue;
        }
        let mut held = Reorder::new(policy);
        held.publish(marks, shard);
        for &(v, seq) in &recovered.above {
            if v % workers == shard {
                held.restore_above(v, [seq]);
            }
        }
        worker_threads.push(
            std::thread::Builder::new()
                .name(format!("nudge-worker-{shard}"))
                .spawn(move || work(worker, rx, current, clock, held, inflight, metrics))
                .map_err(io("worker thread"))?,
        );
        senders.push(tx);
    }

    // Events acknowledged before a crash and not decided: first in line.
    if !recovered.work.is_empty() {
        tracing::info!(
            events = recovered.work.len(),
            "deciding events acknowledged before the last stop"
        );
    }
    for w in recovered.work {
        inflight.fetch_add(1, Ordering::AcqRel);
        let shard = shard_of(&w.event.customer, workers);
        let _ = senders[shard].send(w);
    }
    let groups = recovered.groups;
    let (inbox, committer, node) = match &cluster {
        None => {
            let (inbox, committer) = Inbox::start(
                store.clone(),
                senders,
                recovered.next_seq,
                groups.clone(),
                inflight.clone(),
                cfg.ingest.max_inflight_events,
                metrics.clone(),
            )
            .map_err(io("inbox thread"))?;
            (inbox, Some(committer), None)
        }
        Some(c) => {
            let api = format!("http://{}", listener.local_addr().map_err(io("listener"))?);
            let node = crate::cluster::node::Node::open(
                c,
                api,
                store.clone(),
                senders,
                tenures.clone().unwrap_or_else(|| {
                    Arc::new(crate::cluster::tenure::Tenures::new(c.slots, workers))
                }),
                inflight.clone(),
                cfg.ingest.max_inflight_events,
            )
            .await?;
            node.share_controls(controls.clone()).await?;
            node.share_generations(reloader.clone()).await?;
            (
                Inbox::detached(inflight.clone(), cfg.ingest.max_inflight_events),
                None,
                Some(node),
            )
        }
    };

    // Delivery.
    let (deliver_tx, deliver_rx) = mpsc::channel();
    // Built on its own thread: it owns a small runtime of its own, which
    // must not be created or dropped inside this async context.
    let (ready_tx, ready_rx) = mpsc::channel();
    let deliver_thread = {
        let (store, current, runtime, metrics, controls) = (
            store.clone(),
            current.clone(),
            runtime.clone(),
            metrics.clone(),
            controls.clone(),
        );
        let (smtp, delivery) = (cfg.smtp.clone(), cfg.delivery.clone());
        let owns = node.as_ref().map(|n| cluster::owns(n, &store));
        std::thread::Builder::new()
            .name("nudge-deliver".into())
            .spawn(move || {
                match Deliverer::new(store, current, runtime, &smtp, delivery, metrics) {
                    Ok(mut d) => {
                        d.controls = Some(controls);
                        d.owns = owns;
                        let _ = ready_tx.send(Ok(()));
                        if let Err(e) = d.run(deliver_rx) {
                            tracing::error!("delivery stopped: {e}");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(io("delivery thread"))?
    };
    tokio::task::spawn_blocking(move || ready_rx.recv())
        .await
        .map_err(|e| ServeError::Io {
            what: "delivery thread".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|_| ServeError::Io {
            what: "delivery thread".into(),
            source: std::io::Error::other("exited while starting"),
        })??;

    // Persister.
    let stop_persist = Arc::new(AtomicBool::new(false));
    let persister = if let Some(node) = &node {
        cluster::hand_over_deliveries(node, &store, &deliver_tx);
        let (store, stop, tx, node) = (
            store.clone(),
            stop_persist.clone(),
            deliver_tx.clone(),
            node.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        let window = cfg.ingest.dedupe_window.0;
        let retention = cluster::Retention {
            keep: cfg.measure.retention.0,
            current: current.clone(),
            clock: cfg.server.clock,
        };
        std::thread::Builder::new()
            .name("nudge-persist".into())
            .spawn(move || cluster::persist_loop(store, stop, tx, node, handle, window, retention))
            .map_err(io("persist thread"))?
    } else {
        let (store, stop, tx) = (store.clone(), stop_persist.clone(), deliver_tx.clone());
        let window = cfg.ingest.dedupe_window.0;
        let (groups, marks) = (groups.clone(), recovered.watermarks);
        let retention = Retention {
            keep: cfg.measure.retention.0,
            current: current.clone(),
            clock: cfg.server.clock,
            watermarks: watermarks.clone(),
        };
        std::thread::Builder::new()
            .name("nudge-persist".into())
            .spawn(move || persist_loop(store, stop, tx, window, groups, marks, retention))
            .map_err(io("persist thread"))?
    };

    // Hot reload.
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watch_thread = if cfg.reload.watch {
        Some(reloader.watch(
            cfg.reload.debounce.0,
            cfg.reload.rescan.0,
            stop_watch.clone(),
        )?)
    } else {
        None
    };

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        store: store.clone(),
        inbox,
        metrics: metrics.clone(),
        current: current.clone(),
        reloader: reloader.clone(),
        ids: crate::ingest::MessageIds::new(),
        watermarks,
        deliver: std::sync::Mutex::new(Some(deliver_tx)),
        ui: crate::ui::UiState::default(),
        node: node.clone(),
    });
    let node_task = node.as_ref().map(|n| tokio::spawn(n.clone().run()));
    let addr = listener.local_addr().map_err(io("listener"))?;
    tracing::info!(%addr, workers, clock = ?cfg.server.clock, "nudge serving");
    let app = crate::api::router(shared.clone());
    let limits = crate::listener::Limits {
        max_connections: cfg.server.max_connections,
        header_read_timeout: cfg.server.header_read_timeout.0,
        idle_timeout: cfg.server.idle_timeout.0,
    };
    ready(addr);
    let sampler = tokio::spawn(crate::ui::sample(shared.clone()));
    crate::listener::serve(listener, app, limits, shutdown).await;
    sampler.abort();

    // Drain, in order. No generation changes from here on.
    tracing::info!("shutting down: draining accepted events");
    stop_watch.store(true, Ordering::Release);
    if let Some(t) = watch_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    shared.inbox.close();
    if let Some(node) = &node {
        // Nothing more is read; what was read is decided and committed.
        node.stop().await;
    }
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(c) = committer {
            let _ = c.join();
        }
        for w in worker_threads {
            let _ = w.join();
        }
    })
    .await;
    stop_persist.store(true, Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || persister.join()).await;
    if let Some(node) = &node {
        node.leave().await;
    }
    if let Some(t) = node_task {
        t.abort();
    }
    shared
        .deliver
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let grace = cfg.server.shutdown_grace.0;
    let started = Instant::now();
    while !deliver_thread.is_finished() && started.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !deliver_thread.is_finished() {
        tracing::warn!(
            "deliveries still in flight after the grace period; they stay in the outbox"
        );
    }
    store.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// What the persister needs to forget old decision rows.
struct Retention {
    keep: Duration,
    current: Arc<Current>,
    clock: Clock,
    watermarks: Watermarks,
}

impl Retention {
    /// Deletes the rows of decisions past retention, in chunks, each
    /// persisted before the next is read.
    fn sweep(&self, store: &Store) {
        let now = match self.clock {
            Clock::Wall => now_ms(),
            // Event time: a backtest through the server keeps its past;
            // after a restart, before any event, the last decision is now.
            Clock::Event => match self.watermarks.latest() {
                Some(t) => t,
                None => match store.last_decision() {
                    Ok(Some(t)) => t,
                    _ => return,
                },
            },
        };
        let before = crate::ledger::retention_cutoff(&self.current.load().rules, now, self.keep);
        let mut total = 0;
        loop {
            match store.forget_decisions(before, 10_000).and_then(|n| {
                store.flush()?;
                Ok(n)
            }) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => {
                    tracing::warn!("decision retention sweep failed: {e}");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(forgotten = total, before = %crate::event::format_ts(before), "decision rows past retention");
        }
    }
}

fn persist_loop(
    store: Store,
    stop: Arc<AtomicBool>,
    deliver: Sender<deliver::Input>,
    dedupe_window: Duration,
    groups: Groups,
    mut watermarks: std::collections::HashMap<usize, u64>,
    retention: Retention,
) {
    // The first sweep soon after start-up, then hourly.
    let mut next_sweep = Instant::now() + Duration::from_secs(5);
    loop {
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + DEDUPE_SWEEP_EVERY;
            retention.sweep(&store);
            // A full scan of remembered ids, once an hour, off the ingest
            // path.
            let before = now_ms() - dedupe_window.as_millis() as i64;
            match store.forget_messages(before) {
                Ok(n) => {
                    tracing::info!(forgotten = n, "message ids past the de-duplication window")
                }
                Err(e) => tracing::warn!("message id sweep failed: {e}"),
            }
        }
        let stopping = stop.load(Ordering::Acquire);
        if store.pending_len() == 0 && !stopping {
            std::thread::sleep(PERSIST_EVERY);
            continue;
        }
        match store.flush() {
            Ok(persisted) => {
                if !persisted.outbox.is_empty() {
                    let _ = deliver.send(deliver::Input::New(persisted.outbox));
                }
                watermarks.extend(persisted.watermarks);
                // Inbox groups every shard has decided, durably, can go.
                for first in groups.take_decided(&watermarks) {
                    if let Err(e) = store.remove_inbox_group(first) {
                        tracing::warn!("inbox group {first} not removed (start-up will): {e}");
                    }
                }
            }
            Err(e) => tracing::error!("persist failed (retrying): {e}"),
        }
        if stopping {
            return;
        }
        std::thread::sleep(PERSIST_EVERY);
    }
}
