//! The WASI a policy may import, and nothing more: deterministic, and never blocking.
//!
//! Toolchains for Python (componentize-py), JavaScript (componentize-js) and Rust's
//! `wasm32-wasip2` target produce components that import WASI preview 2 interfaces even when
//! the policy never uses them (their runtimes start up through `wasi:cli`, ask for random seeds,
//! and so on). Such a component is linked against wasmtime-wasi with an empty, deterministic
//! context: no preopened directories, environment, arguments or network; stdin is closed and
//! stdout and stderr are discarded; both clocks are frozen at zero and both random generators
//! are seeded with a constant, so a policy stays a pure function of the step summaries the host
//! passes it (`policy check` verifies that). Components importing anything outside the
//! preview-2 `wasi:` packages this module links (for example `wasi:http`, or host functions of
//! their own) are refused at load time with the list of offending imports.
//!
//! **No host call blocks or runs long.** A guest cannot be interrupted while it is inside a host
//! call (fuel and epoch deadlines only act in Wasm code), so the interfaces that could wait or
//! work without bound are replaced ([`SandboxBlocked`] and [`HostCallLimit`] are the traps):
//! - `wasi:clocks/monotonic-clock`: the clock is frozen at 0, so a pollable from
//!   `subscribe-instant(t)` / `subscribe-duration(d)` is ready when `t == 0` / `d == 0` and
//!   never otherwise (no timer is armed);
//! - `wasi:io/poll`: `poll` and `pollable.block` look at readiness once; if nothing is ready,
//!   the call traps as *blocked* instead of waiting. Every other pollable the sandbox can hand
//!   out is ready at once: stdin is closed, stdout/stderr are sinks, and socket creation and
//!   name lookup are refused before any socket exists. The `blocking-*` stream methods
//!   therefore return at once too;
//! - `wasi:random/random` and `wasi:random/insecure`: at most [`MAX_RANDOM_BYTES`] per call;
//! - host resources (pollables, streams, …) live in a table capped at [`MAX_HOST_RESOURCES`].
//!
//! - `wasi:io/streams` `output-stream.write` and `blocking-write-and-flush`: the length is
//!   checked against the stream's `check-write` permit (64 KiB for the stdout/stderr sinks;
//!   4 KiB for the blocking variant, as the interface says) *before* the bytes are copied out of
//!   guest memory, and a larger write traps as `host_limit`; a blocking write to a stream that is
//!   not ready traps as `blocked`. Reads can only come from the closed stdin: nothing to copy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::pin::pin;
use std::time::Duration;
use wasmtime::StoreContextMut;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, WasmList};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::io::poll::{Host as AsyncPoll, HostPollable as AsyncPollable};
use wasmtime_wasi::p2::bindings::io::streams::{Host as _, StreamError as WitStreamError};
use wasmtime_wasi::p2::bindings::random::{insecure, random};
use wasmtime_wasi::p2::bindings::sync::io::poll;
use wasmtime_wasi::p2::{DynOutputStream, DynPollable, Pollable, StreamError};
use wasmtime_wasi::runtime::{poll_noop, with_ambient_tokio_runtime};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::limits::{MAX_HOST_RESOURCES, MAX_RANDOM_BYTES};

/// Interface-name prefixes the WASI linker provides (the `wasi:cli/imports` world of 0.2).
const PROVIDED_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// The `wasi:io/streams` instance wasmtime-wasi 48 defines (guests' 0.2.x imports resolve to it).
const STREAMS_INTERFACE: &str = "wasi:io/streams@0.2.12";
/// The most `blocking-write-and-flush` takes in one call (the interface's own bound).
const MAX_BLOCKING_WRITE: usize = 4096;

/// The seed of the guest-visible random generators: constant, so runs are reproducible.
const GUEST_RANDOM_SEED: u64 = 0x5eed_5eed_5eed_5eed;

/// What a component imports, sorted into what the sandbox provides and what it refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ImportPlan {
    /// `wasi:*@0.2.x` interfaces served by the empty WASI context.
    pub wasi: Vec<String>,
    /// Everything else: the component is refused.
    pub refused: Vec<String>,
}

impl ImportPlan {
    pub fn classify<'a>(imports: impl IntoIterator<Item = &'a str>) -> Self {
        let mut plan = ImportPlan::default();
        for name in imports {
            let provided = PROVIDED_PACKAGES.iter().any(|p| name.starts_with(p))
                && name
                    .rsplit_once('@')
                    .is_some_and(|(_, v)| v.starts_with("0.2."));
            if provided {
                plan.wasi.push(name.to_string());
            } else {
                plan.refused.push(name.to_string());
            }
        }
        plan
    }

    pub fn needs_wasi(&self) -> bool {
        !self.wasi.is_empty()
    }
}

/// A guest waited for something that can never happen in the sandbox (fault kind `blocked`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blocked: {what} would wait, and nothing in the policy sandbox ever becomes ready")]
pub struct SandboxBlocked {
    what: &'static str,
}

/// A host call asked for more than the sandbox gives in one call, or the instance asked for
/// more host-side structure (table elements) than it may have (fault kind `host_limit`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host-call limit: {what}")]
pub struct HostCallLimit {
    what: String,
}

impl HostCallLimit {
    pub(crate) fn new(what: String) -> Self {
        Self { what }
    }
}

/// Per-store WASI state, built only for components that import WASI.
pub(crate) struct SandboxWasi {
    ctx: WasiCtx,
    table: ResourceTable,
    random: SandboxRandom,
}

impl SandboxWasi {
    pub fn new() -> Self {
        let mut builder = WasiCtxBuilder::new();
        builder
            .wall_clock(FrozenWallClock)
            .monotonic_clock(FrozenMonotonicClock)
            .secure_random(StdRng::seed_from_u64(GUEST_RANDOM_SEED))
            .insecure_random(StdRng::seed_from_u64(GUEST_RANDOM_SEED ^ 1))
            .insecure_random_seed(u128::from(GUEST_RANDOM_SEED))
            .max_random_size(MAX_RANDOM_BYTES)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        Self {
            ctx: builder.build(),
            table,
            random: SandboxRandom {
                secure: StdRng::seed_from_u64(GUEST_RANDOM_SEED),
                insecure: StdRng::seed_from_u64(GUEST_RANDOM_SEED ^ 1),
            },
        }
    }

    pub fn view(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Store data that can hand out its sandbox WASI state.
pub(crate) trait HasSandbox: WasiView + Send + 'static {
    fn sandbox(&mut self) -> &mut SandboxWasi;
}

/// Adds the WASI preview-2 host functions (synchronous variants) to `linker`, with the
/// blocking and unbounded ones replaced (see the module doc).
pub(crate) fn add_to_linker<T: HasSandbox>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, NonBlockingPoll>(linker, |t| NonBlockingPollView {
        table: &mut t.sandbox().table,
    })?;
    monotonic_clock::add_to_linker::<T, FrozenDeadlines>(linker, |t| FrozenDeadlinesView {
        table: &mut t.sandbox().table,
    })?;
    random::add_to_linker::<T, BoundedRandom>(linker, |t| &mut t.sandbox().random)?;
    insecure::add_to_linker::<T, BoundedRandom>(linker, |t| &mut t.sandbox().random)?;
    let mut streams = linker.instance(STREAMS_INTERFACE)?;
    streams.func_wrap(
        "[method]output-stream.write",
        |store: StoreContextMut<'_, T>,
         (stream, bytes): (Resource<DynOutputStream>, WasmList<u8>)| {
            bounded_write(store, stream, bytes, false)
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.blocking-write-and-flush",
        |store: StoreContextMut<'_, T>,
         (stream, bytes): (Resource<DynOutputStream>, WasmList<u8>)| {
            bounded_write(store, stream, bytes, true)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `output-stream.write` (or, with `blocking`, `blocking-write-and-flush`) that checks the
/// length against the permit before copying anything out of guest memory (see the module doc).
fn bounded_write<T: HasSandbox>(
    mut store: StoreContextMut<'_, T>,
    stream: Resource<DynOutputStream>,
    bytes: WasmList<u8>,
    blocking: bool,
) -> wasmtime::Result<(Result<(), WitStreamError>,)> {
    let function = if blocking {
        "blocking-write-and-flush"
    } else {
        "write"
    };
    let permit = match store
        .data_mut()
        .sandbox()
        .table
        .get_mut(&stream)?
        .check_write()
    {
        Ok(permit) => permit,
        Err(error) => return stream_error(store.data_mut().sandbox(), error),
    };
    if blocking && bytes.len() > MAX_BLOCKING_WRITE {
        return Err(wasmtime::Error::new(HostCallLimit::new(format!(
            "output-stream.{function} of {} bytes (at most {MAX_BLOCKING_WRITE})",
            bytes.len()
        ))));
    }
    if bytes.len() > permit {
        if blocking {
            return Err(wasmtime::Error::new(SandboxBlocked {
                what: "wasi:io/streams.output-stream.blocking-write-and-flush",
            }));
        }
        return Err(wasmtime::Error::new(HostCallLimit::new(format!(
            "output-stream.write of {} bytes, more than the {permit} its check-write permits",
            bytes.len()
        ))));
    }
    let data = bytes::Bytes::copy_from_slice(bytes.as_le_slice(&store));
    let sandbox = store.data_mut().sandbox();
    let output = sandbox.table.get_mut(&stream)?;
    let written = output
        .write(data)
        .and_then(|()| if blocking { output.flush() } else { Ok(()) });
    match written {
        Ok(()) => Ok((Ok(()),)),
        Err(error) => stream_error(sandbox, error),
    }
}

/// A stream error as the guest sees it (`closed`, or `last-operation-failed` with an error
/// resource), or a trap.
fn stream_error(
    sandbox: &mut SandboxWasi,
    error: StreamError,
) -> wasmtime::Result<(Result<(), WitStreamError>,)> {
    Ok((Err(sandbox.table.convert_stream_error(error)?),))
}

/// `wasi:io/poll` that looks once and never waits.
struct NonBlockingPoll;

impl HasData for NonBlockingPoll {
    type Data<'a> = NonBlockingPollView<'a>;
}

struct NonBlockingPollView<'a> {
    table: &'a mut ResourceTable,
}

/// Polls `future` once, inside a tokio context (some wasmtime-wasi pollables are tokio-backed).
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    with_ambient_tokio_runtime(|| poll_noop(pin!(future)))
}

impl poll::Host for NonBlockingPollView<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        if pollables.is_empty() {
            wasmtime::bail!("poll: empty pollable list");
        }
        match ready_now(AsyncPoll::poll(self.table, pollables)) {
            Some(ready) => ready,
            None => Err(wasmtime::Error::new(SandboxBlocked {
                what: "wasi:io/poll.poll",
            })),
        }
    }
}

impl poll::HostPollable for NonBlockingPollView<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        ready_now(AsyncPollable::ready(self.table, pollable)).unwrap_or(Ok(false))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        if self.ready(pollable)? {
            Ok(())
        } else {
            Err(wasmtime::Error::new(SandboxBlocked {
                what: "wasi:io/poll.pollable.block",
            }))
        }
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        AsyncPollable::drop(self.table, pollable)
    }
}

/// `wasi:clocks/monotonic-clock` frozen at 0, whose deadlines never pass (see the module doc).
struct FrozenDeadlines;

impl HasData for FrozenDeadlines {
    type Data<'a> = FrozenDeadlinesView<'a>;
}

struct FrozenDeadlinesView<'a> {
    table: &'a mut ResourceTable,
}

/// A deadline of the frozen clock: ready at once if it is not in the future, else never.
struct FrozenDeadline {
    passed: bool,
}

#[wasmtime_wasi::async_trait]
impl Pollable for FrozenDeadline {
    async fn ready(&mut self) {
        if !self.passed {
            std::future::pending::<()>().await;
        }
    }
}

impl FrozenDeadlinesView<'_> {
    fn deadline(&mut self, passed: bool) -> wasmtime::Result<Resource<DynPollable>> {
        let deadline = self.table.push(FrozenDeadline { passed })?;
        wasmtime_wasi::p2::subscribe(self.table, deadline)
    }
}

impl monotonic_clock::Host for FrozenDeadlinesView<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(0)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1_000_000_000)
    }

    fn subscribe_instant(
        &mut self,
        when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.deadline(when == 0)
    }

    fn subscribe_duration(
        &mut self,
        duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.deadline(duration == 0)
    }
}

/// `wasi:random` with constant seeds and at most [`MAX_RANDOM_BYTES`] per call.
pub(crate) struct SandboxRandom {
    secure: StdRng,
    insecure: StdRng,
}

struct BoundedRandom;

impl HasData for BoundedRandom {
    type Data<'a> = &'a mut SandboxRandom;
}

fn random_bytes(rng: &mut StdRng, len: u64, function: &str) -> wasmtime::Result<Vec<u8>> {
    if len > MAX_RANDOM_BYTES {
        return Err(wasmtime::Error::new(HostCallLimit {
            what: format!("{function}({len}) asks for more than {MAX_RANDOM_BYTES} bytes"),
        }));
    }
    let mut bytes = vec![0; len as usize];
    rng.fill_bytes(&mut bytes);
    Ok(bytes)
}

impl random::Host for SandboxRandom {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        random_bytes(&mut self.secure, len, "wasi:random/random.get-random-bytes")
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.secure.next_u64())
    }
}

impl insecure::Host for SandboxRandom {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        random_bytes(
            &mut self.insecure,
            len,
            "wasi:random/insecure.get-insecure-random-bytes",
        )
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.insecure.next_u64())
    }
}

/// `wasi:clocks/wall-clock` stopped at the Unix epoch.
struct FrozenWallClock;

impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// The context's own `wasi:clocks/monotonic-clock` (replaced in the linker by
/// [`FrozenDeadlines`]; kept frozen too so nothing in wasmtime-wasi sees real time).
struct FrozenMonotonicClock;

impl wasmtime_wasi::HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasi_preview2_is_provided_and_everything_else_refused() {
        let plan = ImportPlan::classify([
            "wasi:cli/environment@0.2.3",
            "wasi:io/streams@0.2.0",
            "wasi:random/random@0.2.6",
            "wasi:http/types@0.2.3",
            "wasi:cli/environment@0.3.0",
            "my:host/functions",
        ]);
        assert_eq!(
            plan.wasi,
            [
                "wasi:cli/environment@0.2.3",
                "wasi:io/streams@0.2.0",
                "wasi:random/random@0.2.6"
            ]
        );
        assert_eq!(
            plan.refused,
            [
                "wasi:http/types@0.2.3",
                "wasi:cli/environment@0.3.0",
                "my:host/functions"
            ]
        );
        assert!(plan.needs_wasi());
        assert!(!ImportPlan::classify([]).needs_wasi());
    }

    #[test]
    fn frozen_deadlines_are_ready_only_when_not_in_the_future() {
        let mut table = ResourceTable::new();
        let mut clocks = FrozenDeadlinesView { table: &mut table };
        use monotonic_clock::Host as _;
        let now = clocks.subscribe_duration(0).unwrap();
        let later = clocks.subscribe_duration(1).unwrap();
        let at_zero = clocks.subscribe_instant(0).unwrap();
        let mut poll = NonBlockingPollView { table: &mut table };
        use poll::Host as _;
        use poll::HostPollable as _;
        assert!(poll.ready(Resource::new_borrow(now.rep())).unwrap());
        assert!(poll.ready(Resource::new_borrow(at_zero.rep())).unwrap());
        assert!(!poll.ready(Resource::new_borrow(later.rep())).unwrap());
        let ready = poll
            .poll(vec![
                Resource::new_borrow(later.rep()),
                Resource::new_borrow(now.rep()),
            ])
            .unwrap();
        assert_eq!(ready, [1]);
        let error = poll
            .poll(vec![Resource::new_borrow(later.rep())])
            .unwrap_err();
        assert!(
            error.downcast_ref::<SandboxBlocked>().is_some(),
            "{error:#}"
        );
        let error = poll.block(Resource::new_borrow(later.rep())).unwrap_err();
        assert!(
            error.downcast_ref::<SandboxBlocked>().is_some(),
            "{error:#}"
        );
        poll.block(Resource::new_borrow(now.rep())).unwrap();
    }

    #[test]
    fn random_bytes_are_bounded_and_seeded() {
        let mut a = SandboxWasi::new();
        let mut b = SandboxWasi::new();
        use random::Host as _;
        let bytes = a.random.get_random_bytes(MAX_RANDOM_BYTES).unwrap();
        assert_eq!(bytes.len() as u64, MAX_RANDOM_BYTES);
        assert_eq!(bytes, b.random.get_random_bytes(MAX_RANDOM_BYTES).unwrap());
        let error = a.random.get_random_bytes(8 << 20).unwrap_err();
        assert!(error.downcast_ref::<HostCallLimit>().is_some(), "{error:#}");
        use insecure::Host as _;
        let error = a.random.get_insecure_random_bytes(u64::MAX).unwrap_err();
        assert!(error.downcast_ref::<HostCallLimit>().is_some(), "{error:#}");
    }
}
