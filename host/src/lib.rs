//! # Nudge
//!
//! A real-time trigger-marketing engine: customer events in, decisions about
//! whom to contact, how and why out. See `ARCHITECTURE.md` for the
//! bird's-eye view.
//!
//! # Layout
//!
//! - [`event`]: Segment Spec events and timestamps.
//! - [`store`]: the customer store on sled (traits, plugin state, timers,
//!   decision history and log). Only `store` imports sled.
//! - [`plugins`]: the WASM component runtime: contract bindings, sandbox,
//!   compile cache, per-worker instances. Only `plugins` imports wasmtime.
//! - [`rules`]: campaign and policy files, Rhai expressions.
//! - [`generation`]: one validated set of plugins and rules, swapped atomically.
//! - [`reload`]: watching the folders, building, keeping and activating
//!   generations (hot reload, rollback).
//! - [`controls`]: paused campaigns and quarantined plugins, over the
//!   generation in force.
//! - [`decide`]: the pure decision pipeline. No I/O.
//! - [`worker`]: one event's way through the house.
//! - [`report`]: goals, control vs treated, uplift.
//! - [`stats`]: the statistics of a result: rates, intervals, SRM, verdicts.
//! - [`replay`]: `nudge replay`, a file of events through a worker.
//! - [`config`]: `nudge serve`'s TOML configuration.
//! - [`ingest`]: Segment-compatible requests: auth, gzip, limits, validation.
//! - [`inbox`]: durable acknowledgement by group commit, de-duplication.
//! - [`reorder`]: each serve worker's hold on accepted events, released in
//!   event-time order; the inbox marks that keep that crash-safe.
//! - [`intake`]: what a replay admits from its file: text, the clock, duplicates.
//! - [`serve`]: the live server's threads, start-up recovery and shutdown.
//! - [`listener`]: accepting HTTP connections: limits, timeouts, back-off.
//! - [`api`]: the HTTP routes (axum).
//! - [`admin`]: the operator routes over generations, campaigns, quarantine.
//! - [`customer`]: `GET /v1/customers/{id}`: traits, timers, decisions
//!   explained, conversions, open actions.
//! - [`results`]: `GET /v1/decisions`: the decision log, paged, for export.
//! - [`deliver`]: the outbox to the channels: SMTP, allowlisted HTTP, the
//!   agent queue; retries and dead letters.
//! - [`mail`]: the SMTP client (pooled, `TCP_NODELAY`).
//! - [`manifest`]: what a plugin may ask the host to do.
//! - [`measure`]: what every campaign achieved: uplift with intervals,
//!   value, cost, the funnel, the timing of conversions.
//! - [`metrics`]: Prometheus metrics.
//! - [`bench`]: `nudge bench`, the live server's load generator.
//! - [`bench_reload`]: `nudge bench-reload`, what hot reload costs.
//! - [`authoring`]: `nudge plugin new|build|test`, for plugin authors.
//! - [`remote`]: operator commands against a running server.
//! - [`logging`]: the host's log; control characters escaped in every record.
//! - [`cli`]: the `nudge` command line.

pub mod actions;
pub mod admin;
pub mod api;
pub mod authoring;
pub mod bench;
pub mod bench_reload;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod controls;
pub mod customer;
pub mod decide;
pub mod deliver;
pub mod event;
pub mod forward;
pub mod generation;
pub mod inbox;
pub mod ingest;
pub mod intake;
pub mod ledger;
pub mod listener;
pub mod logging;
pub mod mail;
pub mod manifest;
pub mod measure;
pub mod metrics;
pub mod plugins;
pub mod reload;
pub mod remote;
pub mod reorder;
pub mod replay;
pub mod report;
pub mod reports;
pub mod results;
pub mod rules;
pub mod seen;
pub mod serve;
pub mod sort;
pub mod spill;
pub mod stats;
pub mod store;
pub mod ui;
pub mod worker;

/// The example plugins, compiled for wasm32-wasip2 by the build script.
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}
