//! A live policy instance and the two per-step calls, with faults contained.
//!
//! Each call gets a wall-clock deadline (an epoch deadline, see [`super::epoch`]) and, when
//! fuel metering is on, a fresh fuel budget; instantiation and `configure` get a longer
//! deadline. When the deadline passes, [`deadline_passed`] looks at the thread's CPU time over
//! one more deadline period: a call that keeps the CPU busy is stopped (between one and two
//! deadlines after it began), one that was only descheduled on a busy machine is given more
//! time, up to [`WALL_CAP_FACTOR`] deadlines plus a second. The store's limiter caps the instance's linear memories together, its tables'
//! elements together, and the number of instances, memories and tables ([`super::limits`]).
//! When a call traps, runs out of time, fuel or memory, waits on something that never happens
//! in the sandbox (`blocked`), asks a host call for more than it gives (`host_limit`), or
//! returns a malformed answer, the instance is dropped (a trapped instance cannot be entered
//! again), the fault is counted by kind, and the runtime backs off — 1, 2, 4 … up to
//! `max_backoff_steps` steps — before instantiating again from the pre-linked template. Steps
//! in between go untraced. Nothing here ever panics or returns an error to the step loop.
//!
//! Guests whose heap only grows (a JavaScript engine's does) would reach the memory cap after
//! enough calls and fault on a step. So after each successful call, an instance whose linear
//! memories together have passed [`RECYCLE_MEMORY_FRACTION`] of the cap is retired: the next
//! call instantiates a fresh one, with no fault, no back-off and no untraced step (counted as a
//! recycle).

use super::bindings::{
    RequestArrival, RequestViews, StepSummary, decision_from_v01, plan_from_v01, restore_views_v01,
    summary_v01, take_views_v01, v01, v02,
};
use super::budget::thread_cpu_time;
use super::epoch::deadline_ticks;
use super::faults::{FaultKind, PolicyCounters};
use super::guest_text::sanitize;
use super::limits::{MAX_INSTANCES, MAX_MEMORIES, MAX_TABLE_ELEMENTS, MAX_TABLES};
use super::module::{PolicyError, PolicyModule, PolicyPre, one_line};
use super::params::for_contract_v01;
use super::validate::{
    Decision, JourneyAnswer, RichSelection, check_decision, check_journey_decision, check_rich_plan,
};
use super::wasi::{HasSandbox, HostCallLimit, SandboxBlocked, SandboxWasi};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTableError;
use wasmtime::{ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtxView, WasiView};

/// An instance whose linear memories have grown past this fraction of the memory cap is
/// replaced by a fresh one before its next call.
pub const RECYCLE_MEMORY_FRACTION: f64 = 0.75;

/// A descheduled call may run this many deadlines (plus a second) of wall time before it is
/// stopped anyway.
pub const WALL_CAP_FACTOR: u32 = 10;

/// Per-store host state: the resource limiter, the linear memory and table elements allowed so
/// far, and the sandbox WASI context for components that import WASI (built on first use; see
/// [`super::wasi`]).
pub(crate) struct StoreState {
    limits: StoreLimits,
    /// The memory cap, for all linear memories together.
    memory_cap: usize,
    /// Bytes of all linear memories together.
    memory_total: usize,
    /// Elements of all tables together.
    table_elements_total: usize,
    /// The deadline of the call in progress, when it began, and the thread's CPU time when the
    /// deadline last passed (see [`deadline_passed`]).
    deadline: Duration,
    call_started: Instant,
    cpu_mark: Option<Duration>,
    wasi: Option<SandboxWasi>,
}

impl StoreState {
    fn new(memory_cap: usize) -> Self {
        Self {
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_cap)
                .table_elements(MAX_TABLE_ELEMENTS)
                .instances(MAX_INSTANCES)
                .memories(MAX_MEMORIES)
                .tables(MAX_TABLES)
                .trap_on_grow_failure(true)
                .build(),
            memory_cap,
            memory_total: 0,
            table_elements_total: 0,
            deadline: Duration::ZERO,
            call_started: Instant::now(),
            cpu_mark: None,
            wasi: None,
        }
    }

    /// Starts the deadline of a call (or of instantiation and `configure`).
    fn arm(&mut self, deadline: Duration, started: Instant) {
        self.deadline = deadline;
        self.call_started = started;
        self.cpu_mark = None;
    }
}

/// The epoch deadline of a call has passed. The first time, note the thread's CPU time and
/// wait one more deadline period; after that, stop the call if it kept the CPU busy for at
/// least half of that period, else (it was descheduled) wait again, up to the wall-time cap.
/// Reading the CPU clock costs ~0.5 µs, so it is read here, never at the start of a call.
fn deadline_passed(state: &mut StoreState) -> UpdateDeadline {
    let cap = state.deadline * WALL_CAP_FACTOR + Duration::from_secs(1);
    let Some(cpu) = thread_cpu_time() else {
        return UpdateDeadline::Interrupt;
    };
    if state.call_started.elapsed() >= cap {
        return UpdateDeadline::Interrupt;
    }
    match state.cpu_mark.replace(cpu) {
        Some(mark) if cpu.saturating_sub(mark) * 2 >= state.deadline => UpdateDeadline::Interrupt,
        _ => UpdateDeadline::Continue(deadline_ticks(state.deadline)),
    }
}

/// [`StoreLimits`] per memory and table, plus caps on all memories and all tables together.
impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_total
            .saturating_add(desired.saturating_sub(current));
        if total > self.memory_cap {
            return Err(wasmtime::Error::msg(format!(
                "memory limit: the instance's linear memories would grow to {total} bytes together (cap {})",
                self.memory_cap
            )));
        }
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_total = total;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .table_elements_total
            .saturating_add(desired.saturating_sub(current));
        if total > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(HostCallLimit::new(format!(
                "the instance's tables would hold {total} elements together (at most {MAX_TABLE_ELEMENTS})"
            ))));
        }
        let allowed = self.limits.table_growing(current, desired, maximum)?;
        if allowed {
            self.table_elements_total = total;
        }
        Ok(allowed)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.sandbox().view()
    }
}

impl HasSandbox for StoreState {
    fn sandbox(&mut self) -> &mut SandboxWasi {
        self.wasi.get_or_insert_with(SandboxWasi::new)
    }
}

/// The result of one policy call as seen by the step loop.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyOutcome<T> {
    /// A valid answer.
    Answer(T),
    /// The call failed; the step goes untraced.
    Fault(FaultKind),
    /// The policy is backing off after a fault; no call was made.
    BackingOff,
}

impl<T> PolicyOutcome<T> {
    pub fn answer(self) -> Option<T> {
        match self {
            PolicyOutcome::Answer(answer) => Some(answer),
            _ => None,
        }
    }
}

struct LiveInstance {
    store: Store<StoreState>,
    bindings: Bindings,
}

/// A live instance's exports, per contract version.
enum Bindings {
    V01(v01::StepPolicy),
    V02(v02::StepPolicy),
}

/// Runs one policy module for the step loop.
pub struct PolicyRuntime {
    module: PolicyModule,
    params: Vec<(String, String)>,
    live: Option<LiveInstance>,
    counters: Arc<PolicyCounters>,
    consecutive_faults: u32,
    successes_since_fault: u32,
    resume_at_step: u64,
    /// Wall time of the last guest call (answered or faulted).
    last_call: Duration,
}

/// Successful calls in a row after which a policy's back-off resets to one step.
const SUCCESSES_TO_FORGIVE: u32 = 16;

impl PolicyRuntime {
    /// Instantiates the module and calls `configure(params)`. Errors here refuse the policy.
    pub fn new(
        module: PolicyModule,
        params: Vec<(String, String)>,
        counters: Arc<PolicyCounters>,
    ) -> Result<Self, PolicyError> {
        let live = instantiate(&module, &params).map_err(|e| match e {
            InstantiateError::Instantiate(reason) => PolicyError::Instantiate {
                name: module.name().to_string(),
                reason,
            },
            InstantiateError::Configure(reason) => PolicyError::Configure {
                name: module.name().to_string(),
                reason,
            },
        })?;
        counters.record_instantiation();
        Ok(Self {
            module,
            params,
            live: Some(live),
            counters,
            consecutive_faults: 0,
            successes_since_fault: 0,
            resume_at_step: 0,
            last_call: Duration::ZERO,
        })
    }

    pub fn module(&self) -> &PolicyModule {
        &self.module
    }

    pub fn counters(&self) -> &Arc<PolicyCounters> {
        &self.counters
    }

    /// Wall time of the last guest call, answered or faulted (zero when the last attempt made
    /// no call: backing off, or instantiation failed).
    pub fn last_call(&self) -> Duration {
        self.last_call
    }

    /// Asks the policy about one step.
    pub fn decide(&mut self, summary: &StepSummary) -> PolicyOutcome<Decision> {
        let step_id = summary.step_id;
        self.call(step_id, |live| match &live.bindings {
            Bindings::V02(b) => b
                .stepscope_policy_policy()
                .call_decide(&mut live.store, *summary)
                .map(check_decision),
            Bindings::V01(b) => b
                .stepscope_policy_policy()
                .call_decide(&mut live.store, summary_v01(summary))
                .map(|answer| check_decision(decision_from_v01(answer))),
        })
    }

    /// Asks the policy which running requests of a rich step to snapshot. (`requests` is
    /// borrowed mutably so a 0.1 instance can be handed the columns it knows without a copy;
    /// they are back in place when this returns.)
    pub fn plan_rich(
        &mut self,
        summary: &StepSummary,
        requests: &mut RequestViews,
    ) -> PolicyOutcome<RichSelection> {
        let step_id = summary.step_id;
        let num_requests = requests.request_id.len();
        self.call(step_id, |live| match &live.bindings {
            Bindings::V02(b) => b
                .stepscope_policy_policy()
                .call_plan_rich(&mut live.store, *summary, requests)
                .map(|answer| check_rich_plan(answer, num_requests)),
            Bindings::V01(b) => {
                let old = take_views_v01(requests);
                let answer = b.stepscope_policy_policy().call_plan_rich(
                    &mut live.store,
                    summary_v01(summary),
                    &old,
                );
                restore_views_v01(requests, old);
                answer.map(|answer| check_rich_plan(plan_from_v01(answer), num_requests))
            }
        })
    }

    /// Asks the policy whether a client request's journey is traced (`decide-request`).
    /// `None` for a 0.1 component, which has no such call: the host decides by rate then.
    /// `step_id` (the engine's current step) paces the back-off after a fault.
    pub fn decide_request(
        &mut self,
        arrival: &RequestArrival,
        step_id: u64,
    ) -> Option<PolicyOutcome<JourneyAnswer>> {
        if self.module.contract_version() == super::module::ContractVersion::V01 {
            return None;
        }
        Some(self.call(step_id, |live| {
            match &live.bindings {
                Bindings::V02(b) => b
                    .stepscope_policy_policy()
                    .call_decide_request(&mut live.store, *arrival)
                    .map(check_journey_decision),
                Bindings::V01(_) => Ok(Err("a 0.1 policy has no decide-request".into())),
            }
        }))
    }

    fn call<T>(
        &mut self,
        step_id: u64,
        f: impl FnOnce(&mut LiveInstance) -> wasmtime::Result<Result<T, String>>,
    ) -> PolicyOutcome<T> {
        self.last_call = Duration::ZERO;
        if self.live.is_none() {
            if step_id < self.resume_at_step {
                self.counters.record_skip();
                return PolicyOutcome::BackingOff;
            }
            match instantiate(&self.module, &self.params) {
                Ok(live) => {
                    self.counters.record_instantiation();
                    self.live = Some(live);
                }
                Err(error) => {
                    tracing::warn!(policy = self.module.name(), %error, "policy re-instantiation failed");
                    return self.fault(step_id, FaultKind::Instantiate);
                }
            }
        }
        let Some(live) = self.live.as_mut() else {
            return self.fault(step_id, FaultKind::Instantiate);
        };
        let limits = self.module.limits();
        if limits.fuel_per_call > 0 && live.store.set_fuel(limits.fuel_per_call).is_err() {
            return self.fault(step_id, FaultKind::Instantiate);
        }
        let started = Instant::now();
        live.store.data_mut().arm(limits.call_deadline, started);
        live.store
            .set_epoch_deadline(deadline_ticks(limits.call_deadline));
        let result = f(live);
        let elapsed = started.elapsed();
        self.last_call = elapsed;
        self.counters
            .record_call(elapsed.as_nanos().min(u64::MAX as u128) as u64);
        match result {
            Ok(Ok(answer)) => {
                // Forgive only a sustained recovery, so a policy that faults on every
                // rich step (after a good `decide`) still backs off further each time.
                self.successes_since_fault = self.successes_since_fault.saturating_add(1);
                if self.successes_since_fault >= SUCCESSES_TO_FORGIVE {
                    self.consecutive_faults = 0;
                }
                let cap = limits.memory_bytes;
                let used = live.store.data().memory_total;
                if used as f64 > cap as f64 * RECYCLE_MEMORY_FRACTION {
                    tracing::debug!(
                        policy = self.module.name(),
                        step_id,
                        used,
                        cap,
                        "policy memory near its cap: a fresh instance takes the next call"
                    );
                    self.counters.record_recycle();
                    self.live = None;
                }
                PolicyOutcome::Answer(answer)
            }
            Ok(Err(reason)) => {
                let reason = sanitize(&reason);
                tracing::warn!(policy = self.module.name(), step_id, %reason, "malformed policy answer");
                self.fault(step_id, FaultKind::Malformed)
            }
            Err(error) => {
                let kind = classify(&error);
                tracing::warn!(policy = self.module.name(), step_id, fault = %kind, error = %one_line(&error), "policy call failed");
                self.fault(step_id, kind)
            }
        }
    }

    fn fault<T>(&mut self, step_id: u64, kind: FaultKind) -> PolicyOutcome<T> {
        self.counters.record_fault(kind);
        self.live = None;
        self.successes_since_fault = 0;
        self.consecutive_faults = self.consecutive_faults.saturating_add(1);
        let backoff = 1u64
            .checked_shl(self.consecutive_faults.saturating_sub(1))
            .unwrap_or(u64::MAX)
            .min(self.module.limits().max_backoff_steps.max(1));
        self.resume_at_step = step_id.saturating_add(backoff);
        PolicyOutcome::Fault(kind)
    }
}

enum InstantiateError {
    Instantiate(String),
    Configure(String),
}

impl std::fmt::Display for InstantiateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstantiateError::Instantiate(reason) => write!(f, "instantiation failed: {reason}"),
            InstantiateError::Configure(reason) => write!(f, "configure failed: {reason}"),
        }
    }
}

fn instantiate(
    module: &PolicyModule,
    params: &[(String, String)],
) -> Result<LiveInstance, InstantiateError> {
    let limits = module.limits();
    let mut store = Store::new(module.engine(), StoreState::new(limits.memory_bytes));
    store.limiter(|state| state);
    store.epoch_deadline_callback(|mut store| Ok(deadline_passed(store.data_mut())));
    store
        .data_mut()
        .arm(limits.configure_deadline, Instant::now());
    store.set_epoch_deadline(deadline_ticks(limits.configure_deadline));
    let failed = |e: wasmtime::Error| {
        let reason = match classify(&e) {
            FaultKind::Timeout => format!(
                "did not finish within the configure deadline ({} ms{}): {}",
                limits.configure_deadline.as_millis(),
                match limits.fuel_per_call {
                    0 => String::new(),
                    fuel => format!(", or ran out of its {fuel} fuel"),
                },
                one_line(&e)
            ),
            _ => one_line(&e),
        };
        InstantiateError::Instantiate(reason)
    };
    let fuel = |store: &mut Store<StoreState>| match limits.fuel_per_call {
        0 => Ok(()),
        fuel => store
            .set_fuel(fuel)
            .map_err(|e| InstantiateError::Instantiate(one_line(&e))),
    };
    fuel(&mut store)?;
    let bindings = match module.pre() {
        PolicyPre::V02(pre) => Bindings::V02(pre.instantiate(&mut store).map_err(failed)?),
        PolicyPre::V01(pre) => Bindings::V01(pre.instantiate(&mut store).map_err(failed)?),
    };
    fuel(&mut store)?;
    let configured = match &bindings {
        Bindings::V02(b) => b
            .stepscope_policy_policy()
            .call_configure(&mut store, params),
        Bindings::V01(b) => b
            .stepscope_policy_policy()
            .call_configure(&mut store, &for_contract_v01(params)),
    };
    configured
        .map_err(failed)?
        .map_err(|reason| InstantiateError::Configure(sanitize(&reason)))?;
    Ok(LiveInstance { store, bindings })
}

/// Maps a failed call to its fault kind.
pub(crate) fn classify(error: &wasmtime::Error) -> FaultKind {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::OutOfFuel | Trap::Interrupt => FaultKind::Timeout,
            Trap::AllocationTooLarge => FaultKind::Memory,
            _ => FaultKind::Trap,
        };
    }
    if error.downcast_ref::<SandboxBlocked>().is_some() {
        return FaultKind::Blocked;
    }
    if error.downcast_ref::<HostCallLimit>().is_some()
        || matches!(
            error.downcast_ref::<ResourceTableError>(),
            Some(ResourceTableError::Full)
        )
    {
        return FaultKind::HostLimit;
    }
    let text = format!("{error:#}");
    if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
        FaultKind::Memory
    } else {
        FaultKind::Trap
    }
}
