//! The WASI a plugin gets: enough for Rust's `std` to run, nothing that
//! reaches the world or waits on it.
//!
//! - Clocks stopped at zero; time comes only through the `clock` import.
//! - Every sleep or wait is ready at once: `monotonic-clock.subscribe-*`
//!   hands out a pollable that is already ready, and every other pollable a
//!   plugin can get (stdin, stdout, stderr) is ready too. So no WASI call
//!   blocks a host thread: a plugin's time is all wasm, and the deadline
//!   (epoch interruption) bounds it.
//! - Randomness (`wasi:random`) from a generator the host seeds before every
//!   call from what identifies the call, so the same input decides the same.
//! - stdout and stderr go into a bounded buffer the host logs after the
//!   call; writes past the budget are dropped, never waited for.
//! - No preopened directories, no sockets, no name lookups, a bounded
//!   resource table.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::{Linker, Resource};
use wasmtime::StoreContextMut;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};

use super::host::HostState;

/// Wall and monotonic clocks stopped at zero: plugins read time only
/// through the `clock` import, so replay is deterministic.
pub(super) struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The version of `wasi:clocks` the linker defines (components importing
/// any 0.2.x resolve to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Most resources (pollables, streams) one instance may hold: a plugin that
/// never drops what it asks for cannot grow host memory without bound.
pub(super) const MAX_RESOURCES: usize = 1024;

/// A pollable that is ready the moment it is asked.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

fn ready_pollable(
    mut store: StoreContextMut<'_, HostState>,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let table = &mut store.data_mut().table;
    let ready = table.push(Ready)?;
    Ok((wasmtime_wasi::p2::subscribe(table, ready)?,))
}

/// Replaces WASI's sleeps with ones that are over at once: on the frozen
/// clock no time passes, so there is nothing to wait for. A plugin that
/// loops until the clock moves spins in wasm, where the deadline stops it.
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |store, (_,): (u64,)| {
        ready_pollable(store)
    })?;
    clock.func_wrap("subscribe-instant", |store, (_,): (u64,)| {
        ready_pollable(store)
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The seeds of one instance's two generators (`random` and `insecure`),
/// shared with the generators inside its `WasiCtx` so the host can reseed
/// them before each call.
#[derive(Clone, Default)]
pub(super) struct Seeds(Arc<[AtomicU64; 2]>);

impl Seeds {
    /// Seeds both generators for the next call.
    pub(super) fn reseed(&self, seed: u64) {
        self.0[0].store(seed, Ordering::Relaxed);
        self.0[1].store(seed ^ 0x5851_f42d_4c95_7f2d, Ordering::Relaxed);
    }

    pub(super) fn secure(&self) -> SeededRng {
        SeededRng(self.clone(), 0)
    }

    pub(super) fn insecure(&self) -> SeededRng {
        SeededRng(self.clone(), 1)
    }
}

/// SplitMix64 over a shared state: fast, and the same sequence for the
/// same seed. Not cryptographic; plugins have nothing to keep secret.
pub(super) struct SeededRng(Seeds, usize);

impl SeededRng {
    fn next(&mut self) -> u64 {
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = (self.0 .0[self.1].fetch_add(GAMMA, Ordering::Relaxed)).wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.next() >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next())
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dest.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

/// What a plugin wrote to stdout and stderr during one call, up to a
/// budget of bytes; the rest is counted and dropped.
#[derive(Default)]
pub(super) struct Captured {
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) dropped: u64,
    room: usize,
}

/// One instance's stdout and stderr, shared with its `WasiCtx`.
#[derive(Clone, Default)]
pub(super) struct Output(Arc<Mutex<Captured>>);

impl Output {
    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // Only plain byte copies happen under the lock: a poisoned one
        // still holds consistent data.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties the buffers and allows `budget` bytes for the next call.
    pub(super) fn reset(&self, budget: usize) {
        let mut c = self.lock();
        c.stdout.clear();
        c.stderr.clear();
        c.dropped = 0;
        c.room = budget;
    }

    /// What the call wrote.
    pub(super) fn take(&self) -> Captured {
        std::mem::take(&mut *self.lock())
    }

    fn write(&self, stderr: bool, bytes: &[u8]) {
        let mut c = self.lock();
        let n = bytes.len().min(c.room);
        c.room -= n;
        c.dropped += (bytes.len() - n) as u64;
        let buf = if stderr { &mut c.stderr } else { &mut c.stdout };
        buf.extend_from_slice(&bytes[..n]);
    }

    pub(super) fn stdout(&self) -> Stream {
        Stream(self.clone(), false)
    }

    pub(super) fn stderr(&self) -> Stream {
        Stream(self.clone(), true)
    }
}

/// A plugin's stdout or stderr: always writable, never blocks.
#[derive(Clone)]
pub(super) struct Stream(Output, bool);

/// How much a plugin may write in one go (what `check-write` grants).
const WRITE_PERMIT: usize = 64 << 10;

impl IsTerminal for Stream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Stream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Stream {
    async fn ready(&mut self) {}
}

impl OutputStream for Stream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.0.write(self.1, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.write(self.1, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
