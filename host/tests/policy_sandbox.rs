//! Hostile policies are contained: every misbehaviour becomes a counted fault, the step goes
//! untraced, and the runtime keeps answering later calls. The components are built from
//! `policies/testing/` by `build.rs` as part of this test build.

use std::sync::Arc;
use stepscope::policy::{
    FaultKind, GUEST_COMPONENT_DIR, PolicyCounters, PolicyError, PolicyLimits, PolicyModule,
    PolicyOutcome, PolicyRuntime, PolicySource, devkit::synthetic,
};

fn guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(GUEST_COMPONENT_DIR).join(format!("{name}.wasm"))
}

fn limits() -> PolicyLimits {
    PolicyLimits {
        fuel_per_call: 5_000_000,
        memory_bytes: 16 << 20,
        max_backoff_steps: 8,
        ..PolicyLimits::default()
    }
}

fn hostile(mode: &str) -> (PolicyRuntime, Arc<PolicyCounters>) {
    let module = PolicyModule::load(&PolicySource::File(guest("hostile")), limits()).unwrap();
    let counters = Arc::new(PolicyCounters::default());
    let runtime = PolicyRuntime::new(
        module,
        vec![("mode".to_string(), mode.to_string())],
        counters.clone(),
    )
    .unwrap();
    (runtime, counters)
}

/// Drives `steps` steps of a hostile policy through decide (and plan-rich when asked) and
/// returns the faults it saw. Every call must come back; none may yield an answer that
/// contradicts the mode.
fn drive(runtime: &mut PolicyRuntime, steps: u64) -> Vec<FaultKind> {
    let mut faults = Vec::new();
    for step in 1..=steps {
        let summary = synthetic::step_summary(3, step);
        match runtime.decide(&summary) {
            PolicyOutcome::Fault(kind) => faults.push(kind),
            PolicyOutcome::BackingOff => {}
            PolicyOutcome::Answer(decision) => {
                if decision.emit_rich {
                    let mut views = synthetic::request_views(8, step);
                    if let PolicyOutcome::Fault(kind) = runtime.plan_rich(&summary, &mut views) {
                        faults.push(kind);
                    }
                }
            }
        }
    }
    faults
}

fn assert_contained(mode: &str, expected: FaultKind) {
    let (mut runtime, counters) = hostile(mode);
    let faults = drive(&mut runtime, 40);
    assert!(!faults.is_empty(), "{mode}: no fault seen");
    assert!(
        faults.iter().all(|&k| k == expected),
        "{mode}: expected only {expected:?}, got {faults:?}"
    );
    let snapshot = counters.snapshot();
    // Back-off (1, 2, 4, 8, 8 … steps) means several faults over 40 steps, each counted.
    assert!(snapshot.faults_of(expected) >= 4, "{mode}: {snapshot:?}");
    assert_eq!(snapshot.faults_of(expected), faults.len() as u64);
    assert!(snapshot.skipped_backoff > 0, "{mode}: never backed off");
    assert!(
        snapshot.instantiations >= 4,
        "{mode}: not re-instantiated: {snapshot:?}"
    );
    // The host is unharmed: a well-behaved policy on the same thread answers normally.
    let (mut good, good_counters) = hostile("ok");
    for step in 1..=10 {
        let summary = synthetic::step_summary(3, step);
        assert!(matches!(good.decide(&summary), PolicyOutcome::Answer(_)));
    }
    assert_eq!(good_counters.snapshot().total_faults(), 0);
}

#[test]
fn infinite_loop_is_stopped_by_the_fuel_bound() {
    assert_contained("loop", FaultKind::Timeout);
}

#[test]
fn unbounded_memory_growth_hits_the_memory_cap() {
    assert_contained("memory", FaultKind::Memory);
}

#[test]
fn a_heap_that_only_grows_is_recycled_before_it_faults() {
    // 1 MiB more per call under a 16 MiB cap: without recycling the 16th call or so would hit
    // the cap and fault. Recycled at 3/4 of the cap, every one of 100 steps gets an answer.
    let (mut runtime, counters) = hostile("leak");
    let faults = drive(&mut runtime, 100);
    assert!(faults.is_empty(), "faults: {faults:?}");
    let snapshot = counters.snapshot();
    assert_eq!(snapshot.total_faults(), 0);
    assert_eq!(snapshot.skipped_backoff, 0);
    assert!(
        snapshot.recycles >= 5,
        "expected a recycle every dozen calls or so: {snapshot:?}"
    );
    assert_eq!(snapshot.instantiations, snapshot.recycles + 1);
    // A well-behaved policy is never recycled.
    let (mut runtime, counters) = hostile("ok");
    assert!(drive(&mut runtime, 100).is_empty());
    assert_eq!(counters.snapshot().recycles, 0);
}

#[test]
fn a_trap_is_contained() {
    assert_contained("trap", FaultKind::Trap);
}

#[test]
fn out_of_range_request_index_is_malformed() {
    assert_contained("out-of-range", FaultKind::Malformed);
}

#[test]
fn huge_returned_list_is_malformed() {
    assert_contained("huge-list", FaultKind::Malformed);
}

#[test]
fn duplicate_request_index_is_malformed() {
    assert_contained("duplicate", FaultKind::Malformed);
}

#[test]
fn nan_probability_is_malformed() {
    assert_contained("bad-probability", FaultKind::Malformed);
}

#[test]
fn rich_without_batch_is_malformed() {
    assert_contained("rich-without-batch", FaultKind::Malformed);
}

#[test]
fn oversized_extra_attribute_is_malformed() {
    assert_contained("long-extra", FaultKind::Malformed);
}

#[test]
fn a_well_behaved_policy_recovers_after_back_off() {
    // The "ok" mode never faults: answers on every step, one instantiation.
    let (mut runtime, counters) = hostile("ok");
    assert!(drive(&mut runtime, 100).is_empty());
    let snapshot = counters.snapshot();
    assert_eq!(snapshot.instantiations, 1);
    assert_eq!(snapshot.total_faults(), 0);
    assert!(snapshot.calls >= 200, "{snapshot:?}");
}

#[test]
fn configure_error_refuses_the_policy_at_start_up() {
    let module = PolicyModule::load(&PolicySource::File(guest("hostile")), limits()).unwrap();
    let error = PolicyRuntime::new(
        module,
        vec![("mode".into(), "fail-configure".into())],
        Arc::new(PolicyCounters::default()),
    )
    .err()
    .expect("configure error must refuse the policy");
    assert!(matches!(error, PolicyError::Configure { .. }), "{error}");
    assert!(error.to_string().contains("configure refused on purpose"));
}

fn load_error(name: &str, bytes: &[u8]) -> String {
    let error = PolicyModule::from_bytes(name, bytes, limits()).expect_err("must be refused");
    let message = error.to_string();
    assert!(!message.contains('\n'), "not one line: {message}");
    message
}

#[test]
fn a_file_that_is_not_wasm_is_refused_with_one_line() {
    let message = load_error("notes.txt", b"this is not a policy\n");
    assert!(
        message.contains("notes.txt") && message.contains("not a WebAssembly file"),
        "{message}"
    );
}

#[test]
fn a_core_module_is_refused_with_a_hint() {
    let message = load_error("core.wasm", b"\0asm\x01\0\0\0");
    assert!(
        message.contains("core WebAssembly module, not a component"),
        "{message}"
    );
}

#[test]
fn truncated_component_is_refused() {
    let bytes = std::fs::read(guest("default")).unwrap();
    let message = load_error("cut.wasm", &bytes[..bytes.len() / 2]);
    assert!(
        message.contains("invalid WebAssembly component"),
        "{message}"
    );
}

#[test]
fn a_component_exporting_the_wrong_world_is_refused() {
    let bytes = std::fs::read(guest("wrong-world")).unwrap();
    let message = load_error("wrong-world.wasm", &bytes);
    assert!(
        message.contains("does not export `stepscope:policy/policy@0.2.0`")
            && message.contains("or `stepscope:policy/policy@0.1.0`")
            && message.contains("example:other/greeter@1.0.0"),
        "{message}"
    );
}

#[test]
fn a_component_importing_host_functions_is_refused_naming_the_import() {
    let bytes = std::fs::read(guest("host-import")).unwrap();
    let message = load_error("host-import.wasm", &bytes);
    assert!(
        message.contains("imports example:host-import/clock")
            && message.contains("which a policy may not use"),
        "{message}"
    );
}

/// The extra attributes of one decision of the WASI probe, as a map.
fn probe(runtime: &mut PolicyRuntime, step: u64) -> std::collections::HashMap<String, String> {
    match runtime.decide(&synthetic::step_summary(0, step)) {
        PolicyOutcome::Answer(decision) => decision.extra.into_iter().collect(),
        other => panic!("the WASI probe did not answer: {other:?}"),
    }
}

#[test]
fn a_wasi_component_runs_in_an_empty_deterministic_sandbox() {
    let module = PolicyModule::load(&PolicySource::File(guest("wasi-probe")), limits()).unwrap();
    assert!(
        module
            .wasi_imports()
            .iter()
            .any(|name| name.starts_with("wasi:cli/environment@0.2")),
        "{:?}",
        module.wasi_imports()
    );
    let counters = Arc::new(PolicyCounters::default());
    let mut first = PolicyRuntime::new(module.clone(), Vec::new(), counters.clone()).unwrap();
    let mut second = PolicyRuntime::new(module, Vec::new(), counters.clone()).unwrap();
    let a = probe(&mut first, 1);
    assert_eq!(
        a["clock_ns"], "0",
        "the wall clock must be frozen at the epoch"
    );
    assert_eq!(
        a["env_args"], "0/0",
        "no environment variables or arguments"
    );
    assert_eq!(a["fs_net"], "denied/denied", "no filesystem and no network");
    // Randomness is seeded: two instances (and later calls) see the same stream.
    let b = probe(&mut second, 1);
    assert_eq!(a["random"], b["random"]);
    for step in 2..50 {
        assert_eq!(probe(&mut first, step), probe(&mut second, step));
    }
    assert_eq!(counters.snapshot().total_faults(), 0);
}

#[test]
fn the_conformance_suite_passes_a_wasi_component() {
    let module = PolicyModule::load(&PolicySource::File(guest("wasi-probe")), limits()).unwrap();
    let suite = stepscope::policy::devkit::conformance::SuiteParams {
        params: Vec::new(),
        seed: 0,
        steps: 500,
        measure_latency: false,
        time_limit: std::time::Duration::from_secs(120),
    };
    let report = stepscope::policy::devkit::conformance::check(&module, &suite).unwrap();
    assert!(report.passed(), "{report}");
    assert!(
        report.to_string().contains("WASI 0.2 interfaces"),
        "{report}"
    );
}
