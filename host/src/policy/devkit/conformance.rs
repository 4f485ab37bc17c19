//! `stepscope policy check` and `policy run`: what a policy author runs before deploying.
//!
//! The check loads the component (which validates it against the contract), configures it,
//! and drives it over a synthetic step stream: the same inputs on two fresh instances must give
//! identical answers (policies are pure), rich is never requested without batch, every answer
//! is well-formed, no call faults, and call latency is measured. Every call runs under the
//! module's deadlines, and the whole check under a wall-clock limit: a policy that blocks,
//! times out or is slow ends the check early with a verdict that says so, never a hang. A
//! `decide` whose p99 passes the serving budget's floor gets a warning (it would be set aside
//! for the built-in default on short steps; see [`crate::policy::budget`]). `run` reports the sampling
//! rates a policy produces over N synthetic steps.

use super::synthetic;
use crate::latency::LatencyStats;
use crate::policy::bindings::StepSummary;
use crate::policy::budget::BudgetConfig;
use crate::policy::faults::{FaultKind, PolicyCounters};
use crate::policy::module::{PolicyError, PolicyModule};
use crate::policy::runtime::{PolicyOutcome, PolicyRuntime};
use crate::policy::validate::{Decision, RichSelection};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One line of the verdict.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    /// A passed line that deserves attention (printed `warn`).
    pub warning: bool,
}

impl CheckLine {
    fn new(name: &'static str, passed: bool, detail: String) -> Self {
        Self {
            name,
            passed,
            detail,
            warning: false,
        }
    }
}

/// The outcome of `policy check`.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub policy: String,
    pub digest: String,
    pub lines: Vec<CheckLine>,
    pub decide_latency: Option<LatencyStats>,
    pub rich_latency: Option<LatencyStats>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|line| line.passed)
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "policy {} ({})", self.policy, self.digest)?;
        for line in &self.lines {
            let mark = match (line.passed, line.warning) {
                (false, _) => "FAIL",
                (true, true) => "warn",
                (true, false) => "ok  ",
            };
            writeln!(f, "  [{mark}] {:<28} {}", line.name, line.detail)?;
        }
        if let Some(stats) = &self.decide_latency {
            writeln!(f, "  decide latency: {stats}")?;
        }
        if let Some(stats) = &self.rich_latency {
            writeln!(f, "  plan-rich latency (256 requests): {stats}")?;
        }
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "verdict: {verdict}")
    }
}

/// Parameters of a check or a run.
#[derive(Debug, Clone)]
pub struct SuiteParams {
    pub params: Vec<(String, String)>,
    pub seed: u64,
    pub steps: u64,
    /// Also time `decide` (20 000 calls) and `plan-rich` (2 000 calls over 256 requests).
    pub measure_latency: bool,
    /// Wall-clock limit of the whole check (loading not included).
    pub time_limit: Duration,
}

/// Synthetic arrivals `decide-request` is checked on.
const ARRIVALS_CHECKED: u64 = 2_000;

/// `decide-request` on synthetic arrivals: valid answers, identical across two instances, and
/// the traced share; for a 0.1 component, that the host decides its journeys.
fn decide_request_line(
    first: &mut PolicyRuntime,
    second: &mut PolicyRuntime,
    suite: &SuiteParams,
    step: u64,
) -> CheckLine {
    let (mut traced, mut mismatches, mut faults) = (0u64, 0u64, 0u64);
    for id in 1..=ARRIVALS_CHECKED {
        let arrival = synthetic::request_arrival(suite.seed, id);
        let (Some(a), Some(b)) = (
            first.decide_request(&arrival, step),
            second.decide_request(&arrival, step),
        ) else {
            return CheckLine::new(
                "decide-request",
                true,
                "contract 0.1: no decide-request; the host decides journeys by \
                 --journey-tracing-sample-rate (ParentBased)"
                    .to_string(),
            );
        };
        match (a, b) {
            (PolicyOutcome::Answer(a), PolicyOutcome::Answer(b)) => {
                traced += u64::from(a.trace);
                mismatches += u64::from(a != b);
            }
            _ => faults += 1,
        }
    }
    CheckLine::new(
        "decide-request",
        faults == 0 && mismatches == 0,
        format!(
            "{ARRIVALS_CHECKED} synthetic arrivals: {traced} traced, {faults} faults, \
             {mismatches} answers differing between two instances"
        ),
    )
}

/// Runs the conformance suite. Load errors are returned as `Err` (the component is refused).
pub fn check(module: &PolicyModule, suite: &SuiteParams) -> Result<CheckReport, PolicyError> {
    let counters = Arc::new(PolicyCounters::default());
    let mut first = PolicyRuntime::new(module.clone(), suite.params.clone(), counters.clone())?;
    let mut second = PolicyRuntime::new(module.clone(), suite.params.clone(), counters.clone())?;
    let started = Instant::now();
    let mut lines = vec![CheckLine::new(
        "contract",
        true,
        format!(
            "exports {} (contract {}) and configure accepted the parameters",
            match module.contract_version() {
                crate::policy::ContractVersion::V02 => crate::policy::POLICY_INTERFACE,
                crate::policy::ContractVersion::V01 => crate::policy::POLICY_INTERFACE_V01,
            },
            module.contract_version().as_str()
        ),
    )];
    lines.push(CheckLine::new(
        "sandbox",
        true,
        if module.wasi_imports().is_empty() {
            "imports nothing".to_string()
        } else {
            format!(
                "imports {} WASI 0.2 interfaces, served by an empty context (no files, \
                 network or environment; clocks frozen, randomness seeded, no call blocks)",
                module.wasi_imports().len()
            )
        },
    ));

    let mut mismatches = 0u64;
    let mut rich_without_batch = 0u64;
    let mut faults: Vec<(u64, FaultKind)> = Vec::new();
    let (mut batch, mut rich, mut plans) = (0u64, 0u64, 0u64);
    let mut decide_nanos: Vec<u64> = Vec::with_capacity(suite.steps.min(1 << 20) as usize);
    let mut steps_run = 0u64;
    for step in 1..=suite.steps {
        if started.elapsed() > suite.time_limit {
            break;
        }
        steps_run = step;
        let summary = synthetic::step_summary(suite.seed, step);
        let a = first.decide(&summary);
        if !first.last_call().is_zero() {
            decide_nanos.push(u64::try_from(first.last_call().as_nanos()).unwrap_or(u64::MAX));
        }
        let b = second.decide(&summary);
        match (&a, &b) {
            (PolicyOutcome::Answer(x), PolicyOutcome::Answer(y)) => {
                if x != y {
                    mismatches += 1;
                }
                if x.emit_rich && !x.emit_batch {
                    rich_without_batch += 1;
                }
                batch += u64::from(x.emit_batch);
                if x.emit_rich {
                    rich += 1;
                    // Plan over a varying number of requests; both instances must agree.
                    let mut views = synthetic::request_views((step % 64) as usize, step);
                    let p = first.plan_rich(&summary, &mut views);
                    let q = second.plan_rich(&summary, &mut views);
                    plans += 1;
                    match (&p, &q) {
                        (PolicyOutcome::Answer(p), PolicyOutcome::Answer(q)) => {
                            if p != q {
                                mismatches += 1;
                            }
                        }
                        _ => note_fault(&mut faults, step, &p, &q),
                    }
                }
            }
            _ => note_fault(&mut faults, step, &a, &b),
        }
    }
    let timed_out = steps_run < suite.steps;
    lines.push(CheckLine::new(
        "time limit",
        !timed_out,
        if timed_out {
            format!(
                "stopped after {steps_run} of {} steps: the check ran past its {} s limit \
                 (the policy blocks, times out or is slow; see the fault line)",
                suite.steps,
                suite.time_limit.as_secs_f64()
            )
        } else {
            format!(
                "{} steps in {:.1} s (limit {} s)",
                suite.steps,
                started.elapsed().as_secs_f64(),
                suite.time_limit.as_secs_f64()
            )
        },
    ));
    let recycles = match counters.snapshot().recycles {
        0 => String::new(),
        n => format!(" ({n} instances retired with memory near the cap)"),
    };
    lines.push(CheckLine::new(
        "no faults",
        faults.is_empty(),
        match faults.first() {
            None => format!(
                "{steps_run} steps, {plans} rich plans, no trap/timeout/blocked call/malformed \
                 answer{recycles}"
            ),
            Some((step, kind)) => format!(
                "{} faults; first at step {step}: {kind}{}",
                faults.len(),
                fault_hint(*kind, module)
            ),
        },
    ));
    lines.push(CheckLine::new(
        "deterministic",
        mismatches == 0,
        if mismatches == 0 {
            "two fresh instances gave identical answers for the same seed".to_string()
        } else {
            format!("{mismatches} answers differed between two instances fed the same steps")
        },
    ));
    lines.push(CheckLine::new(
        "rich implies batch",
        rich_without_batch == 0,
        format!("batch-sampled {batch}, rich-sampled {rich} of {steps_run} steps"),
    ));
    lines.push(CheckLine::new(
        "full sample rate",
        true,
        format!(
            "observed batch rate {:.5}, rich rate {:.6}",
            batch as f64 / steps_run.max(1) as f64,
            rich as f64 / steps_run.max(1) as f64
        ),
    ));
    lines.push(budget_line(decide_nanos));
    lines.push(decide_request_line(
        &mut first,
        &mut second,
        suite,
        steps_run,
    ));

    let (decide_latency, rich_latency) = if suite.measure_latency && !timed_out {
        (
            measure_decide(&mut first, suite.seed, 20_000),
            measure_rich(&mut first, suite.seed, 256, 2_000),
        )
    } else {
        (None, None)
    };
    let faults_after = counters.snapshot().total_faults();
    if faults_after > faults.len() as u64 {
        lines.push(CheckLine::new(
            "latency run",
            false,
            format!(
                "{} faults while timing calls",
                faults_after - faults.len() as u64
            ),
        ));
    }
    Ok(CheckReport {
        policy: module.name().to_string(),
        digest: module.digest().to_string(),
        lines,
        decide_latency,
        rich_latency,
    })
}

/// What a fault kind means for the author, in a few words.
fn fault_hint(kind: FaultKind, module: &PolicyModule) -> String {
    let limits = module.limits();
    match kind {
        FaultKind::Timeout => format!(
            " (a call ran past its {} ms deadline{})",
            limits.call_deadline.as_millis(),
            match limits.fuel_per_call {
                0 => String::new(),
                fuel => format!(" or its {fuel} fuel"),
            }
        ),
        FaultKind::Blocked => " (the policy waited on a clock or a poll; nothing in the \
             sandbox ever becomes ready, so blocking calls trap)"
            .to_string(),
        FaultKind::HostLimit => {
            " (a host call asked for too much: random bytes, resources or table elements)"
                .to_string()
        }
        FaultKind::Memory => format!(" (memory cap {} MiB)", limits.memory_bytes >> 20),
        _ => String::new(),
    }
}

/// Warns when `decide`'s p99 passes the serving budget's floor.
fn budget_line(mut decide_nanos: Vec<u64>) -> CheckLine {
    let floor = BudgetConfig::default().floor;
    decide_nanos.sort_unstable();
    let Some(&p99) = decide_nanos.get((decide_nanos.len() * 99).div_ceil(100).saturating_sub(1))
    else {
        return CheckLine::new("step budget", true, "no decide call completed".to_string());
    };
    let p99 = Duration::from_nanos(p99);
    let over = p99 > floor;
    CheckLine {
        name: "step budget",
        passed: true,
        warning: over,
        detail: if over {
            format!(
                "decide p99 {} µs is over the default budget floor of {} µs: when serving, \
                 steps shorter than {} µs would be answered by the built-in default instead",
                p99.as_micros(),
                floor.as_micros(),
                (p99.as_secs_f64() / BudgetConfig::DEFAULT_SHARE * 1e6) as u64
            )
        } else {
            format!(
                "decide p99 {} µs, within the default budget floor of {} µs",
                p99.as_micros(),
                floor.as_micros()
            )
        },
    }
}

fn note_fault<A, B>(
    faults: &mut Vec<(u64, FaultKind)>,
    step: u64,
    a: &PolicyOutcome<A>,
    b: &PolicyOutcome<B>,
) {
    for outcome in [fault_of(a), fault_of(b)].into_iter().flatten() {
        faults.push((step, outcome));
    }
}

fn fault_of<T>(outcome: &PolicyOutcome<T>) -> Option<FaultKind> {
    match outcome {
        PolicyOutcome::Fault(kind) => Some(*kind),
        PolicyOutcome::BackingOff => Some(FaultKind::Instantiate),
        PolicyOutcome::Answer(_) => None,
    }
}

/// Times `decide` over `n` synthetic steps (ns per call).
pub fn measure_decide(runtime: &mut PolicyRuntime, seed: u64, n: u64) -> Option<LatencyStats> {
    let summaries: Vec<StepSummary> = (1..=n).map(|s| synthetic::step_summary(seed, s)).collect();
    let mut samples = Vec::with_capacity(summaries.len());
    for summary in &summaries {
        let started = Instant::now();
        let outcome = runtime.decide(summary);
        samples.push(started.elapsed().as_nanos() as u64);
        outcome.answer()?;
    }
    LatencyStats::from_nanos(samples)
}

/// Times `plan-rich` with `requests` request views over `n` calls (ns per call).
pub fn measure_rich(
    runtime: &mut PolicyRuntime,
    seed: u64,
    requests: usize,
    n: u64,
) -> Option<LatencyStats> {
    let summary = synthetic::step_summary(seed, 1);
    let mut views = synthetic::request_views(requests, 1);
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let started = Instant::now();
        let outcome: PolicyOutcome<RichSelection> = runtime.plan_rich(&summary, &mut views);
        samples.push(started.elapsed().as_nanos() as u64);
        outcome.answer()?;
    }
    LatencyStats::from_nanos(samples)
}

/// What `policy run` observed.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub steps: u64,
    pub batch: u64,
    pub rich: u64,
    pub faults: u64,
    pub backing_off: u64,
    /// The decision sequence (step ids batch-sampled), kept for determinism tests.
    pub batch_steps_hash: u64,
}

impl RunReport {
    pub fn batch_rate(&self) -> f64 {
        self.batch as f64 / self.steps.max(1) as f64
    }

    pub fn rich_rate(&self) -> f64 {
        self.rich as f64 / self.steps.max(1) as f64
    }
}

/// Runs a policy over `steps` synthetic steps and counts its decisions.
pub fn run(runtime: &mut PolicyRuntime, seed: u64, steps: u64) -> RunReport {
    let mut report = RunReport {
        steps,
        ..RunReport::default()
    };
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for step in 1..=steps {
        let summary = synthetic::step_summary(seed, step);
        match runtime.decide(&summary) {
            PolicyOutcome::Answer(Decision {
                emit_batch,
                emit_rich,
                ..
            }) => {
                let code = u64::from(emit_batch) | u64::from(emit_rich) << 1;
                hash = (hash ^ (step << 2 | code)).wrapping_mul(0x100_0000_01b3);
                report.batch += u64::from(emit_batch);
                report.rich += u64::from(emit_rich);
            }
            PolicyOutcome::Fault(_) => report.faults += 1,
            PolicyOutcome::BackingOff => report.backing_off += 1,
        }
    }
    report.batch_steps_hash = hash;
    report
}
