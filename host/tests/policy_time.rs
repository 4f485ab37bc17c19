//! Policies cannot stall the engine in time: every WASI call that could wait traps as
//! `blocked`, every host call that could work without bound is capped (`host_limit`) or stopped
//! by the wall-clock deadline (`timeout`), and the calls that are harmless return at once. The
//! `stall` component (built from `policies/testing/stall` by `build.rs`) tries each in turn.
//! Each drive runs on a helper thread with a generous bound, so a regression fails the test
//! instead of hanging it (the bound checks that calls return, not how fast they are).

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use stepscope::policy::{
    FaultKind, GUEST_COMPONENT_DIR, PolicyCounters, PolicyCountersSnapshot, PolicyError,
    PolicyLimits, PolicyModule, PolicyOutcome, PolicyRuntime, PolicySource, devkit::synthetic,
};

fn guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(GUEST_COMPONENT_DIR).join(format!("{name}.wasm"))
}

fn limits() -> PolicyLimits {
    PolicyLimits {
        fuel_per_call: 5_000_000,
        memory_bytes: 16 << 20,
        max_backoff_steps: 4,
        call_deadline: Duration::from_millis(10),
        ..PolicyLimits::default()
    }
}

fn runtime(
    name: &str,
    params: &[(&str, &str)],
    limits: PolicyLimits,
) -> Result<(PolicyRuntime, Arc<PolicyCounters>), PolicyError> {
    let module = PolicyModule::load(&PolicySource::File(guest(name)), limits)?;
    let counters = Arc::new(PolicyCounters::default());
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let runtime = PolicyRuntime::new(module, params, counters.clone())?;
    Ok((runtime, counters))
}

/// What a drive saw: the faults in order, the `probe` attribute of the last answer, and the
/// counters.
struct Drive {
    faults: Vec<FaultKind>,
    answers: u64,
    last_probe: Option<String>,
    counters: PolicyCountersSnapshot,
}

/// Drives `steps` steps of `name` with `params` on a helper thread (decide, and plan-rich when
/// asked); fails if the drive does not come back within a minute.
fn drive(name: &'static str, params: &[(&str, &str)], limits: PolicyLimits, steps: u64) -> Drive {
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let label = format!("{name} {params:?}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (mut runtime, counters) = runtime(name, &params, limits).expect("loads");
        let mut drive = Drive {
            faults: Vec::new(),
            answers: 0,
            last_probe: None,
            counters: PolicyCountersSnapshot::default(),
        };
        for step in 1..=steps {
            let summary = synthetic::step_summary(7, step);
            match runtime.decide(&summary) {
                PolicyOutcome::Fault(kind) => drive.faults.push(kind),
                PolicyOutcome::BackingOff => {}
                PolicyOutcome::Answer(decision) => {
                    drive.answers += 1;
                    drive.last_probe = decision
                        .extra
                        .iter()
                        .find(|(k, _)| k == "probe")
                        .map(|(_, v)| v.clone());
                    if decision.emit_rich {
                        let mut views = synthetic::request_views(8, step);
                        if let PolicyOutcome::Fault(kind) = runtime.plan_rich(&summary, &mut views)
                        {
                            drive.faults.push(kind);
                        }
                    }
                }
            }
        }
        drive.counters = counters.snapshot();
        let _ = tx.send(drive);
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{label}: the policy calls did not come back"))
}

/// Every fault of `mode` is `expected`, several were counted (back-off: 1, 2, 4, 4 … steps),
/// and the instance kept being re-created.
fn assert_contained(mode: &str, expected: FaultKind) -> Drive {
    let drive = drive("stall", &[("mode", mode)], limits(), 30);
    assert!(!drive.faults.is_empty(), "{mode}: no fault seen");
    assert!(
        drive.faults.iter().all(|&k| k == expected),
        "{mode}: expected only {expected:?}, got {:?}",
        drive.faults
    );
    assert!(
        drive.counters.faults_of(expected) >= 4,
        "{mode}: {:?}",
        drive.counters
    );
    assert!(
        drive.counters.instantiations >= 4,
        "{mode}: {:?}",
        drive.counters
    );
    drive
}

#[test]
fn waiting_on_a_clock_deadline_traps_as_blocked() {
    assert_contained("sleep", FaultKind::Blocked);
    assert_contained("sleep-forever", FaultKind::Blocked);
}

#[test]
fn polling_with_nothing_ready_traps_as_blocked() {
    assert_contained("poll", FaultKind::Blocked);
}

#[test]
fn oversized_random_requests_are_a_host_limit() {
    assert_contained("random-huge", FaultKind::HostLimit);
    assert_contained("insecure-random-huge", FaultKind::HostLimit);
}

#[test]
fn hoarding_host_resources_is_a_host_limit() {
    assert_contained("resource-flood", FaultKind::HostLimit);
}

#[test]
fn a_write_past_the_streams_permit_is_a_host_limit() {
    assert_contained("stdout-huge", FaultKind::HostLimit);
}

#[test]
fn cpu_spent_in_host_calls_is_stopped_by_the_deadline() {
    // Each 64 KiB of random bytes costs the guest a few fuel and the host ~0.2 ms: fuel alone
    // would let this run for seconds; the 10 ms wall-clock deadline stops it.
    assert_contained("random-loop", FaultKind::Timeout);
    assert_contained("stdout-loop", FaultKind::Timeout);
}

#[test]
fn the_deadline_stops_a_loop_without_fuel() {
    let limits = PolicyLimits {
        fuel_per_call: 0,
        ..limits()
    };
    let drive = drive("hostile", &[("mode", "loop")], limits, 20);
    assert!(!drive.faults.is_empty());
    assert!(
        drive.faults.iter().all(|&k| k == FaultKind::Timeout),
        "{:?}",
        drive.faults
    );
}

#[test]
fn harmless_wasi_calls_return_at_once_without_a_fault() {
    for (mode, probe) in [
        ("ok", "ok"),
        ("poll-ready", "ready [0]"),
        ("stdin", "stdin closed"),
        ("network", "tcp false lookup false"),
    ] {
        let drive = drive("stall", &[("mode", mode)], limits(), 20);
        assert!(drive.faults.is_empty(), "{mode}: {:?}", drive.faults);
        assert_eq!(drive.answers, 20, "{mode}");
        assert_eq!(drive.last_probe.as_deref(), Some(probe), "{mode}");
        assert_eq!(drive.counters.instantiations, 1, "{mode}");
    }
}

#[test]
fn a_policy_that_blocks_after_n_calls_faults_then_serves_again() {
    // Good for 5 calls per instance, then blocked; each re-instantiation is good for 5 more.
    let drive = drive("stall", &[("mode", "sleep"), ("after", "5")], limits(), 60);
    assert!(drive.faults.iter().all(|&k| k == FaultKind::Blocked));
    assert!(drive.faults.len() >= 3, "{:?}", drive.faults);
    assert!(drive.answers >= 15, "answers: {}", drive.answers);
}

#[test]
fn a_slow_but_legal_policy_does_not_fault() {
    // About a millisecond per call: within the fuel and the deadline. The step budget, not the
    // runtime, deals with it (see policy::budget and the tracer tests).
    let limits = PolicyLimits {
        fuel_per_call: 50_000_000,
        call_deadline: Duration::from_secs(5),
        ..limits()
    };
    let drive = drive("stall", &[("mode", "slow"), ("spin", "200000")], limits, 10);
    assert!(drive.faults.is_empty(), "{:?}", drive.faults);
    assert_eq!(drive.answers, 10);
}

#[test]
fn a_configure_error_is_escaped_and_cut() {
    let error = runtime("stall", &[("fail", "refused:")], limits())
        .err()
        .expect("configure refuses");
    let text = error.to_string();
    assert!(matches!(error, PolicyError::Configure { .. }), "{text}");
    assert!(text.len() < 1_500, "{} bytes", text.len());
    assert!(text.contains("refused:\\n2026-12-06"), "{text}");
    assert!(text.contains("\\u{1b}[2J"), "{text}");
    assert!(text.contains("more bytes cut]"), "{text}");
    assert!(!text.chars().any(char::is_control), "{text:?}");
}

#[test]
fn a_configure_that_blocks_is_refused_at_start_up_with_a_clear_reason() {
    let error = runtime("stall", &[("block-in-configure", "1")], limits())
        .err()
        .expect("refused");
    let text = error.to_string();
    assert!(matches!(error, PolicyError::Instantiate { .. }), "{text}");
    assert!(text.contains("blocked"), "{text}");
}
