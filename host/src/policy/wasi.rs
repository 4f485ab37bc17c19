//! The WASI a policy may import, and nothing more.
//!
//! Toolchains for Python (componentize-py), JavaScript (componentize-js) and Rust's
//! `wasm32-wasip2` target produce components that import WASI preview 2 interfaces even when
//! the policy never uses them (their runtimes start up through `wasi:cli`, ask for random seeds,
//! and so on). Such a component is linked against wasmtime-wasi with an empty, deterministic
//! context: no preopened directories, environment, arguments, stdin or network (stdout and
//! stderr are discarded); both clocks are frozen at zero and both random generators are seeded
//! with a constant, so a policy stays a pure function of the step summaries the host passes it
//! (`policy check` verifies that). Components importing anything outside the preview-2 `wasi:`
//! packages this module links (for example `wasi:http`, or host functions of their own) are
//! refused at load time with the list of offending imports.

use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Interface-name prefixes the WASI linker provides (the `wasi:cli/imports` world of 0.2).
const PROVIDED_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

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

/// Per-store WASI state, built only for components that import WASI.
pub(crate) struct SandboxWasi {
    ctx: WasiCtx,
    table: ResourceTable,
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
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        Self {
            ctx: builder.build(),
            table: ResourceTable::new(),
        }
    }

    pub fn view(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Adds the WASI preview-2 host functions (synchronous variants) to `linker`.
pub(crate) fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)
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

/// `wasi:clocks/monotonic-clock` that never advances.
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
}
