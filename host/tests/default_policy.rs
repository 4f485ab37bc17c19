//! The embedded default policy: two-stage sampling at the configured rates, reproducible from
//! the seed, and identical to its native twin.

use std::sync::Arc;
use stepscope::policy::{
    PolicyCounters, PolicyLimits, PolicyModule, PolicyOutcome, PolicyRuntime, PolicySource,
    devkit::{conformance, native, synthetic},
};

fn default_runtime(sample_rate: f64, rich_rate: f64) -> PolicyRuntime {
    let module =
        PolicyModule::load(&PolicySource::BuiltinDefault, PolicyLimits::default()).unwrap();
    PolicyRuntime::new(
        module,
        stepscope::policy::PolicyParams::rates(sample_rate, rich_rate).to_configure(),
        Arc::new(PolicyCounters::default()),
    )
    .unwrap()
}

/// |observed - n p| within 4 standard deviations of a binomial(n, p).
fn assert_rate(name: &str, observed: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let z = (observed as f64 - mean) / sd;
    assert!(
        z.abs() <= 4.0,
        "{name}: observed {observed}, expected {mean:.1} ± {sd:.1} (z = {z:.2})"
    );
}

#[test]
fn observed_rates_over_a_million_steps_match_r_and_r_times_q() {
    const STEPS: u64 = 1_000_000;
    for (r, q) in [(0.01, 0.001), (0.3, 0.2), (0.05, 0.5)] {
        let mut runtime = default_runtime(r, q);
        let report = conformance::run(&mut runtime, 11, STEPS);
        assert_eq!(report.faults + report.backing_off, 0);
        assert_rate("batch", report.batch, STEPS, r);
        assert_rate("rich", report.rich, STEPS, r * q);
    }
}

#[test]
fn rich_is_never_decided_without_batch() {
    let mut runtime = default_runtime(0.5, 0.9);
    let mut rich = 0;
    for step in 1..=100_000 {
        let decision = runtime
            .decide(&synthetic::step_summary(5, step))
            .answer()
            .unwrap();
        assert!(!decision.emit_rich || decision.emit_batch, "step {step}");
        rich += u64::from(decision.emit_rich);
        assert_eq!(
            (decision.batch_probability, decision.rich_probability),
            (0.5, 0.9)
        );
    }
    assert!(rich > 0);
}

#[test]
fn same_seed_same_decisions_different_seed_different_decisions() {
    let run = |seed| conformance::run(&mut default_runtime(0.1, 0.1), seed, 50_000);
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a.batch_steps_hash, b.batch_steps_hash);
    assert_eq!((a.batch, a.rich), (b.batch, b.rich));
    assert_ne!(a.batch_steps_hash, c.batch_steps_hash);
}

#[test]
fn wasm_default_decides_exactly_like_the_native_function() {
    let mut runtime = default_runtime(0.2, 0.3);
    for step in 1..=50_000 {
        let summary = synthetic::step_summary(9, step);
        let PolicyOutcome::Answer(wasm) = runtime.decide(&summary) else {
            panic!("fault at step {step}");
        };
        assert_eq!(
            wasm,
            native::default_decide(0.2, 0.3, &summary),
            "step {step}"
        );
    }
}

#[test]
fn rich_plan_names_every_running_request_with_every_attribute() {
    let mut runtime = default_runtime(1.0, 1.0);
    let summary = synthetic::step_summary(0, 1);
    for n in [0, 1, 64, 256] {
        let mut views = synthetic::request_views(n, 1);
        let plan = runtime.plan_rich(&summary, &mut views).answer().unwrap();
        assert_eq!(plan.requests, (0..n as u32).collect::<Vec<_>>());
        assert_eq!(
            plan.attributes,
            stepscope::policy::SnapshotAttributes::all()
        );
    }
}

#[test]
fn default_policy_refuses_unknown_or_invalid_parameters() {
    let module =
        PolicyModule::load(&PolicySource::BuiltinDefault, PolicyLimits::default()).unwrap();
    for params in [
        vec![("sample_rate".to_string(), "2".to_string())],
        vec![("sample_rate".to_string(), "x".to_string())],
        vec![("bogus".to_string(), "1".to_string())],
    ] {
        let result = PolicyRuntime::new(
            module.clone(),
            params.clone(),
            Arc::new(PolicyCounters::default()),
        );
        assert!(result.is_err(), "{params:?} accepted");
    }
}

#[test]
fn conformance_suite_passes_the_default_and_fails_a_hostile_policy() {
    let suite = conformance::SuiteParams {
        params: stepscope::policy::PolicyParams::rates(0.5, 0.5).to_configure(),
        seed: 0,
        steps: 5_000,
        measure_latency: true,
        time_limit: std::time::Duration::from_secs(120),
    };
    let module =
        PolicyModule::load(&PolicySource::BuiltinDefault, PolicyLimits::default()).unwrap();
    let report = conformance::check(&module, &suite).unwrap();
    assert!(report.passed(), "{report}");
    assert!(report.decide_latency.is_some() && report.rich_latency.is_some());

    let hostile = std::path::Path::new(stepscope::policy::GUEST_COMPONENT_DIR).join("hostile.wasm");
    let module = PolicyModule::load(&PolicySource::File(hostile), PolicyLimits::default()).unwrap();
    let mut params = suite.params.clone();
    params.push(("mode".into(), "out-of-range".into()));
    let report =
        conformance::check(&module, &conformance::SuiteParams { params, ..suite }).unwrap();
    assert!(!report.passed(), "{report}");
    assert!(report.to_string().contains("malformed"), "{report}");
}
