//! Hot swap: replacing the step-tracing policy of a running engine.
//!
//! A [`PolicySwitch`] is shared by the step-loop observer and whatever asks for a swap (the
//! admin endpoint, SIGHUP). [`PolicySwitch::swap`] runs on the caller's thread, never on the step
//! loop: it compiles the new component (through the compile cache), runs a short conformance
//! check on fresh instances (contract, no faults, determinism, rich implies batch), then
//! instantiates and configures the instance that will serve, with the server's parameters (the
//! step-tracing rates and `--step-tracing-policy-arg`s), or with the rates and the `key=value`
//! arguments given with the swap. Only then is it parked in the switch and announced as active; at its next
//! step the observer takes it (one relaxed atomic load per step when nothing is pending) and
//! drops the old instance off the loop. A component that fails any of this is refused with the
//! reason and the old policy keeps running; requests are never touched. Swaps are serialized.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use thiserror::Error;

use crate::policy::devkit::conformance::{self, SuiteParams};
use crate::policy::params::{RICH_SUBSAMPLE_RATE_KEY, SAMPLE_RATE_KEY};
use crate::policy::{
    PolicyCounters, PolicyError, PolicyLimits, PolicyModule, PolicyParams, PolicyRuntime,
};

use super::record::PolicyIdentity;

/// Synthetic steps the pre-swap check drives each candidate through.
pub const SWAP_CHECK_STEPS: u64 = 2_000;
/// Wall-clock limit of the pre-swap check: a candidate that makes it run longer is refused, and
/// the swap lock is released (every call inside it also has its own deadline).
pub const SWAP_CHECK_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What started a policy's tenure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyOrigin {
    /// Loaded at start-up.
    Startup,
    /// Uploaded to `POST /admin/policy`.
    Admin,
    /// Re-read from `--step-tracing-policy` on SIGHUP.
    Reload,
}

/// The active policy, as `GET /admin/policy` and `/metrics` report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivePolicy {
    pub name: String,
    pub digest: String,
    pub size_bytes: usize,
    /// When it became active (Unix time, milliseconds).
    pub loaded_at_unix_ms: u64,
    pub origin: PolicyOrigin,
    /// WASI interfaces it imports (served by the empty sandbox).
    pub wasi_imports: usize,
    /// 0 for the start-up policy, +1 per successful swap.
    pub generation: u64,
    /// Time to compile, check and instantiate it, in milliseconds.
    pub load_ms: u64,
    /// What its `configure` received.
    pub params: Vec<(String, String)>,
}

/// Why a swap was refused. The old policy keeps running in every case.
#[derive(Debug, Error)]
pub enum SwapError {
    #[error(transparent)]
    Refused(#[from] PolicyError),
    #[error("{name}: failed the pre-swap check: {failures}")]
    CheckFailed { name: String, failures: String },
}

/// A checked, configured instance waiting for the step loop.
pub(crate) struct PendingPolicy {
    pub runtime: PolicyRuntime,
    pub identity: Arc<PolicyIdentity>,
}

/// The hand-over point between swap requests and the step loop (see the module doc).
pub struct PolicySwitch {
    params: PolicyParams,
    limits: PolicyLimits,
    seed: u64,
    counters: Arc<PolicyCounters>,
    has_pending: AtomicBool,
    pending: Mutex<Option<PendingPolicy>>,
    active: Mutex<ActivePolicy>,
    /// Held for the whole of a swap, so swaps never interleave.
    swapping: Mutex<()>,
    swaps: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for PolicySwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySwitch")
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl PolicySwitch {
    pub(crate) fn new(
        module: &PolicyModule,
        params: PolicyParams,
        seed: u64,
        counters: Arc<PolicyCounters>,
        load_ms: u64,
    ) -> Self {
        Self {
            params: params.clone(),
            limits: module.limits(),
            seed,
            counters,
            has_pending: AtomicBool::new(false),
            pending: Mutex::new(None),
            active: Mutex::new(ActivePolicy {
                name: module.name().to_string(),
                digest: module.digest().to_string(),
                size_bytes: module.size_bytes(),
                loaded_at_unix_ms: unix_ms(SystemTime::now()),
                origin: PolicyOrigin::Startup,
                wasi_imports: module.wasi_imports().len(),
                generation: 0,
                load_ms,
                params: params.to_configure(),
            }),
            swapping: Mutex::new(()),
            swaps: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The policy that decides the next step.
    pub fn active(&self) -> ActivePolicy {
        lock(&self.active).clone()
    }

    /// Successful swaps so far.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Refused swap attempts so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The server's policy parameters: the step-tracing rates and the
    /// `--step-tracing-policy-arg`s.
    pub fn params(&self) -> &PolicyParams {
        &self.params
    }

    /// The parameters for a swap: the server's, or, when `args` is given, the server's rates
    /// with `args` (so a policy with parameters of its own can replace another).
    fn params_for(&self, args: Option<&[(String, String)]>) -> PolicyParams {
        match args {
            None => self.params.clone(),
            Some(args) => self.params.with_args(args),
        }
    }

    /// Compiles, checks and installs `bytes` (blocking: call it off async worker threads).
    /// `name` becomes `policy.name` on the spans it samples; `args` replaces the server's
    /// `--step-tracing-policy-arg`s for this policy (see [`Self::params`]).
    pub fn swap(
        &self,
        name: &str,
        bytes: &[u8],
        origin: PolicyOrigin,
        args: Option<&[(String, String)]>,
    ) -> Result<ActivePolicy, SwapError> {
        let _one_at_a_time = lock(&self.swapping);
        let started = Instant::now();
        let params = self.params_for(args);
        let result = self.prepare(name, bytes, &params);
        let (module, runtime) = match result {
            Ok(ready) => ready,
            Err(error) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(policy = name, %error, "policy swap refused; the old policy keeps running");
                return Err(error);
            }
        };
        let identity = Arc::new(PolicyIdentity {
            name: Arc::from(module.name()),
            digest: Arc::from(module.digest()),
        });
        let generation = self.swaps.fetch_add(1, Ordering::Relaxed) + 1;
        let active = ActivePolicy {
            name: module.name().to_string(),
            digest: module.digest().to_string(),
            size_bytes: module.size_bytes(),
            loaded_at_unix_ms: unix_ms(SystemTime::now()),
            origin,
            wasi_imports: module.wasi_imports().len(),
            generation,
            load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            params: params.to_configure(),
        };
        {
            // A swap that was never picked up (an idle engine) is simply superseded.
            let mut pending = lock(&self.pending);
            *pending = Some(PendingPolicy { runtime, identity });
            *lock(&self.active) = active.clone();
            self.has_pending.store(true, Ordering::Release);
        }
        tracing::info!(
            policy = %active.name,
            digest = %active.digest,
            origin = ?origin,
            load_ms = active.load_ms,
            "step-tracing policy swapped; active from the next step"
        );
        Ok(active)
    }

    fn prepare(
        &self,
        name: &str,
        bytes: &[u8],
        params: &PolicyParams,
    ) -> Result<(PolicyModule, PolicyRuntime), SwapError> {
        let module = PolicyModule::from_bytes(name, bytes, self.limits)?;
        // The check samples about half of the synthetic steps at both stages (so `plan-rich`
        // runs too), then the serving instance is configured with the real parameters.
        let check_params = PolicyParams {
            args: [
                &params.args[..],
                &[
                    (SAMPLE_RATE_KEY.into(), "0.5".into()),
                    (RICH_SUBSAMPLE_RATE_KEY.into(), "0.5".into()),
                ],
            ]
            .concat(),
            ..params.clone()
        };
        let report = conformance::check(
            &module,
            &SuiteParams {
                params: check_params.to_configure(),
                seed: self.seed,
                steps: SWAP_CHECK_STEPS,
                measure_latency: false,
                time_limit: SWAP_CHECK_TIME_LIMIT,
            },
        )?;
        if !report.passed() {
            let failures = report
                .lines
                .iter()
                .filter(|line| !line.passed)
                .map(|line| format!("{}: {}", line.name, line.detail))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(SwapError::CheckFailed {
                name: module.name().to_string(),
                failures,
            });
        }
        let runtime = PolicyRuntime::new(
            module.clone(),
            params.to_configure(),
            Arc::clone(&self.counters),
        )?;
        Ok((module, runtime))
    }

    /// The step loop's side: a pending policy, if one was installed since the last call.
    #[inline]
    pub(crate) fn take_pending(&self) -> Option<PendingPolicy> {
        if !self.has_pending.load(Ordering::Relaxed) {
            return None;
        }
        let mut pending = lock(&self.pending);
        self.has_pending.store(false, Ordering::Relaxed);
        pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{GUEST_COMPONENT_DIR, PolicySource};

    fn guest(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(GUEST_COMPONENT_DIR).join(format!("{name}.wasm")))
            .unwrap()
    }

    fn switch_with(args: &[(String, String)]) -> PolicySwitch {
        let module =
            PolicyModule::load(&PolicySource::BuiltinDefault, PolicyLimits::default()).unwrap();
        let params = PolicyParams::rates(0.5, 0.0).with_args(args);
        PolicySwitch::new(&module, params, 0, Arc::default(), 1)
    }

    fn switch() -> PolicySwitch {
        switch_with(&[])
    }

    #[test]
    fn a_checked_policy_is_handed_to_the_step_loop_once() {
        let switch = switch();
        let before = switch.active();
        assert_eq!(
            (before.generation, before.origin),
            (0, PolicyOrigin::Startup)
        );
        assert!(switch.take_pending().is_none());
        let active = switch
            .swap("pressure", &guest("pressure"), PolicyOrigin::Admin, None)
            .unwrap();
        assert_eq!(active, switch.active());
        assert_eq!((active.generation, active.origin), (1, PolicyOrigin::Admin));
        assert_ne!(active.digest, before.digest);
        let pending = switch.take_pending().expect("pending");
        assert_eq!(&*pending.identity.name, "pressure");
        assert_eq!(pending.runtime.module().digest(), active.digest);
        assert!(switch.take_pending().is_none(), "handed over exactly once");
        assert_eq!((switch.swaps(), switch.refused()), (1, 0));
    }

    #[test]
    fn refused_swaps_leave_the_active_policy_alone() {
        let switch = switch();
        let before = switch.active();
        let cases: [(&str, Vec<u8>, &str); 3] = [
            ("garbage", b"not wasm".to_vec(), "not a WebAssembly file"),
            ("wrong", guest("wrong-world"), "does not export"),
            (
                "cut",
                guest("pressure")[..1000].to_vec(),
                "invalid WebAssembly component",
            ),
        ];
        for (name, bytes, expected) in cases {
            let error = switch
                .swap(name, &bytes, PolicyOrigin::Admin, None)
                .expect_err(name);
            assert!(error.to_string().contains(expected), "{name}: {error}");
            assert_eq!(switch.active(), before);
            assert!(switch.take_pending().is_none());
        }
        assert_eq!((switch.swaps(), switch.refused()), (0, 3));
    }

    #[test]
    fn a_policy_that_faults_fails_the_pre_swap_check() {
        // The hostile policy with `mode=trap` compiles and configures, then traps on every call.
        let switch = switch_with(&[("mode".into(), "trap".into())]);
        let before = switch.active();
        let error = switch
            .swap("hostile", &guest("hostile"), PolicyOrigin::Reload, None)
            .expect_err("a trapping policy must be refused");
        assert!(
            matches!(error, SwapError::CheckFailed { .. })
                && error.to_string().contains("no faults"),
            "{error}"
        );
        assert_eq!(switch.active(), before);
        assert_eq!((switch.swaps(), switch.refused()), (0, 1));
    }

    #[test]
    fn swap_arguments_replace_the_servers_policy_arguments() {
        // The server runs pressure-specific arguments; the default refuses them...
        let switch = switch_with(&[("kv_usage_threshold".into(), "0.5".into())]);
        let error = switch
            .swap(
                "default",
                crate::policy::DEFAULT_POLICY_WASM,
                PolicyOrigin::Admin,
                None,
            )
            .expect_err("unknown parameter");
        assert!(error.to_string().contains("kv_usage_threshold"), "{error}");
        // ...but accepts the swap with its own (here: none), keeping the server's rates.
        let active = switch
            .swap(
                "default",
                crate::policy::DEFAULT_POLICY_WASM,
                PolicyOrigin::Admin,
                Some(&[]),
            )
            .unwrap();
        assert_eq!(
            active.params,
            PolicyParams::rates(0.5, 0.0).to_configure(),
            "the rates stay, the arguments go"
        );
        let args = [("rich_top_k".to_string(), "2".to_string())];
        let active = switch
            .swap(
                "pressure",
                &guest("pressure"),
                PolicyOrigin::Admin,
                Some(&args),
            )
            .unwrap();
        assert_eq!(
            active.params,
            PolicyParams::rates(0.5, 0.0)
                .with_args(&args)
                .to_configure()
        );
    }
}
