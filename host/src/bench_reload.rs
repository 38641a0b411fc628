//! `nudge bench-reload`: what hot reload costs. Starts a server here whose
//! plugins and rules are files in a temporary folder (the example plugins
//! written out, a copy of a rules folder), then measures:
//!
//! - the time from a file being written (renamed into place) to the new
//!   generation being active, as `/healthz` reports it, for a changed rule,
//!   a changed plugin whose compiled artifact is cached (two versions
//!   alternating), and a changed plugin never seen before (compiled);
//! - the load generator's throughput with no reloads, with reloads of
//!   cached plugin versions, and with reloads that compile a new plugin
//!   version each time, in the same process, in rotating rounds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::{self, percentile, BenchError};
use crate::config::{Config, Dur};

#[derive(Clone, Debug)]
pub struct Options {
    /// Rules to copy in (the example campaigns by default).
    pub rules: PathBuf,
    /// Measured reloads per kind of change.
    pub iterations: usize,
    pub debounce: Duration,
    /// Events per throughput round; 0 skips the throughput comparison.
    pub events: usize,
    /// Rounds of each kind (none, cached, compiled), rotating.
    pub rounds: usize,
    /// How often a file changes during the reload rounds.
    pub reload_every: Duration,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub change: &'static str,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Round {
    /// `none`, `cached` (rule edits and two known plugin versions in
    /// turn) or `compiled` (rule edits and a new plugin version each time).
    pub reloads: &'static str,
    pub acked_events_per_sec: f64,
    pub decided_events_per_sec: f64,
    /// Generations activated during the round.
    pub generations: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub debounce_ms: f64,
    pub latency: Vec<Latency>,
    pub rounds: Vec<Round>,
    /// Median decided events/s with cached reloads over without.
    pub throughput_ratio: Option<f64>,
    /// The same with compiling reloads.
    pub throughput_ratio_compiled: Option<f64>,
}

fn fail(e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(e.to_string())
}

/// `bytes` with a custom section appended: the same component, another
/// content hash (what a rebuilt plugin looks like to the host).
pub fn with_custom_section(bytes: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

fn publish(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BenchError> {
    crate::reload::publish(dir, name, bytes).map_err(fail)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    (!v.is_empty()).then(|| v[v.len() / 2])
}

async fn generation(client: &reqwest::Client, url: &str) -> Result<u64, BenchError> {
    let body = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .map_err(fail)?
        .bytes()
        .await
        .map_err(fail)?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(fail)?;
    v["generation"]
        .as_u64()
        .ok_or_else(|| fail("/healthz has no generation"))
}

/// Applies `change(i)` and times until the generation after `*current`
/// is active.
async fn measure(
    client: &reqwest::Client,
    url: &str,
    current: &mut u64,
    iterations: usize,
    mut change: impl FnMut(usize) -> Result<(), BenchError>,
) -> Result<Vec<f64>, BenchError> {
    let mut out = Vec::with_capacity(iterations);
    for i in 0..iterations {
        change(i)?;
        let t0 = Instant::now();
        loop {
            let g = generation(client, url).await?;
            if g > *current {
                *current = g;
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(fail(format!(
                    "change {i}: no new generation within 60 s (rejected? see the log)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(t0.elapsed().as_secs_f64() * 1e3);
        // Let the watcher settle before the next change.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(out)
}

fn latency(change: &'static str, mut ms: Vec<f64>) -> Latency {
    ms.sort_by(|a, b| a.total_cmp(b));
    Latency {
        change,
        samples: ms.len(),
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    }
}

pub async fn run(o: Options) -> Result<Report, BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("nudge-bench-reload-")
        .tempdir()
        .map_err(fail)?;
    let (plugins, rules) = (dir.path().join("plugins"), dir.path().join("rules"));
    std::fs::create_dir_all(&plugins).map_err(fail)?;
    std::fs::create_dir_all(&rules).map_err(fail)?;
    for (name, bytes, manifest) in crate::embedded::EMBEDDED {
        publish(&plugins, &format!("{name}.wasm"), bytes)?;
        publish(&plugins, &format!("{name}.toml"), manifest.as_bytes())?;
    }
    let mut campaign = None;
    for f in crate::rules::rule_files(&o.rules).map_err(fail)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&f).map_err(fail)?;
        if campaign.is_none() && name != crate::rules::POLICIES_FILE {
            campaign = Some((name.clone(), text.clone()));
        }
        publish(&rules, &name, text.as_bytes())?;
    }
    let (campaign_file, campaign_text) =
        campaign.ok_or_else(|| fail(format!("{}: no campaign to edit", o.rules.display())))?;
    // The plugin that changes: the response plugin (any would do).
    let (plugin_name, plugin_bytes) = crate::embedded::EMBEDDED
        .iter()
        .find(|(n, _, _)| *n == "agent-script")
        .map(|(n, b, _)| (format!("{n}.wasm"), b.to_vec()))
        .ok_or_else(|| fail("no agent-script plugin built in"))?;

    let mut cfg = Config::default();
    cfg.server.data = dir.path().join("data");
    cfg.server.rules = rules.clone();
    cfg.server.plugins = Some(plugins.clone());
    // A cache of its own: "never seen" plugins are really compiled.
    cfg.server.cache = dir.path().join("cache");
    cfg.reload.debounce = Dur(o.debounce);
    cfg.reload.rescan = Dur(Duration::ZERO);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(fail)?;
    let url = format!("http://{}", listener.local_addr().map_err(fail)?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(crate::serve::run(cfg.clone(), listener, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut current = loop {
        match generation(&client, &url).await {
            Ok(g) => break g,
            Err(_) if started.elapsed() < Duration::from_secs(60) && !handle.is_finished() => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e),
        }
    };

    let edit = |i: usize| {
        let text = format!("{campaign_text}\n# bench edit {i}\n");
        publish(&rules, &campaign_file, text.as_bytes())
    };
    let rule_ms = measure(&client, &url, &mut current, o.iterations, edit).await?;

    let variant = |tag: &str| with_custom_section(&plugin_bytes, "nudge-bench", tag.as_bytes());
    let (a, b) = (variant("a"), variant("b"));
    // Both versions seen once (compiled), then alternate: cached.
    measure(&client, &url, &mut current, 2, |i| {
        publish(&plugins, &plugin_name, if i % 2 == 0 { &a } else { &b })
    })
    .await?;
    let cached_ms = measure(&client, &url, &mut current, o.iterations, |i| {
        publish(&plugins, &plugin_name, if i % 2 == 0 { &a } else { &b })
    })
    .await?;
    let fresh_ms = measure(&client, &url, &mut current, o.iterations, |i| {
        publish(&plugins, &plugin_name, &variant(&format!("fresh-{i}")))
    })
    .await?;

    let mut rounds = Vec::new();
    if o.events > 0 {
        // Round 0 warms up (caches, allocator, connections) and is not
        // reported; then the three kinds rotate.
        const KINDS: [&str; 3] = ["none", "cached", "compiled"];
        for r in 0..=o.rounds.max(1) * KINDS.len() {
            let warmup = r == 0;
            let kind = if warmup {
                "none"
            } else {
                KINDS[(r - 1) % KINDS.len()]
            };
            let stop_changes = Arc::new(AtomicBool::new(false));
            let compile = kind == "compiled";
            let changer = (kind != "none").then(|| {
                let (stop, rules, plugins) = (stop_changes.clone(), rules.clone(), plugins.clone());
                let (file, text, name) = (
                    campaign_file.clone(),
                    campaign_text.clone(),
                    plugin_name.clone(),
                );
                let (a, b) = (a.clone(), b.clone());
                let every = o.reload_every;
                let count = Arc::new(AtomicUsize::new(0));
                let n = count.clone();
                let t = std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let i = n.fetch_add(1, Ordering::AcqRel);
                        // A rule edit and a plugin version, in turn.
                        let result = if i.is_multiple_of(2) {
                            publish(
                                &rules,
                                &file,
                                format!("{text}\n# load edit {i}\n").as_bytes(),
                            )
                        } else if compile {
                            let fresh = with_custom_section(
                                &a,
                                "nudge-bench-load",
                                format!("{r}-{i}").as_bytes(),
                            );
                            publish(&plugins, &name, &fresh)
                        } else {
                            publish(&plugins, &name, if i % 4 == 1 { &a } else { &b })
                        };
                        if let Err(e) = result {
                            tracing::error!("bench change failed: {e}");
                        }
                        std::thread::sleep(every);
                    }
                });
                (t, count)
            });
            let before = generation(&client, &url).await?;
            let load = bench::Options {
                url: Some(url.clone()),
                write_key: None,
                events: if warmup { o.events / 4 } else { o.events },
                batch: 500,
                connections: 4,
                rate: None,
                customers: 20_000,
                // Fresh customers and a different stream every round, so
                // rounds do equal work.
                first_customer: r * 20_000,
                seed: 2 * r as u64 + 1,
                reports: 0,
                report_every: Duration::from_secs(1),
                probe: "/v1/reports".into(),
                token: None,
                data: None,
            };
            let report = bench::run(load, cfg.clone()).await;
            stop_changes.store(true, Ordering::Release);
            if let Some((t, _)) = changer {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            let report = report?;
            let after = generation(&client, &url).await?;
            if warmup {
                continue;
            }
            rounds.push(Round {
                reloads: kind,
                acked_events_per_sec: report.acked_events_per_sec,
                decided_events_per_sec: report.decided_events_per_sec,
                generations: after - before,
            });
            // The last change's generation settles before the next round.
            tokio::time::sleep(o.debounce + Duration::from_millis(200)).await;
        }
    }
    let _ = stop.send(());
    handle.await.map_err(fail)??;
    let med = |kind: &str| {
        median(
            rounds
                .iter()
                .filter(|r| r.reloads == kind)
                .map(|r| r.decided_events_per_sec)
                .collect(),
        )
    };
    let ratio = |kind: &str| match (med(kind), med("none")) {
        (Some(w), Some(wo)) if wo > 0.0 => Some(w / wo),
        _ => None,
    };
    let (throughput_ratio, throughput_ratio_compiled) = (ratio("cached"), ratio("compiled"));
    Ok(Report {
        debounce_ms: o.debounce.as_secs_f64() * 1e3,
        latency: vec![
            latency("rule", rule_ms),
            latency("plugin, cached artifact", cached_ms),
            latency("plugin, never seen (compiled)", fresh_ms),
        ],
        rounds,
        throughput_ratio,
        throughput_ratio_compiled,
    })
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = format!(
            "file written -> generation active (debounce {:.0} ms):\n",
            self.debounce_ms
        );
        for l in &self.latency {
            out.push_str(&format!(
                "  {:<32} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} samples)\n",
                l.change, l.p50_ms, l.p99_ms, l.max_ms, l.samples
            ));
        }
        for r in &self.rounds {
            out.push_str(&format!(
                "  {:<12} {:>8.0} events/s acked, {:>8.0} decided, {} generations during\n",
                match r.reloads {
                    "none" => "no reloads",
                    "cached" => "reloads",
                    _ => "compiling",
                },
                r.acked_events_per_sec,
                r.decided_events_per_sec,
                r.generations
            ));
        }
        if let Some(x) = self.throughput_ratio {
            out.push_str(&format!(
                "  decided throughput with reloads / without: {x:.3}\n"
            ));
        }
        if let Some(x) = self.throughput_ratio_compiled {
            out.push_str(&format!(
                "  decided throughput with compiling reloads / without: {x:.3}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_section_changes_the_hash_not_the_component() {
        let (_, bytes, _) = crate::embedded::EMBEDDED[0];
        let rt = crate::plugins::Runtime::new(crate::plugins::Limits::default(), None).unwrap();
        let a = rt.load("a", bytes).unwrap();
        let long = "x".repeat(300); // a multi-byte LEB128 length
        let b = rt
            .load(
                "b",
                &with_custom_section(bytes, "nudge-bench", long.as_bytes()),
            )
            .unwrap();
        assert_eq!(a.name, b.name);
        assert_ne!(a.hash, b.hash);
    }
}
