//! Both versions of the policy contract. A component built against 0.1.0 (`default-v01`, the
//! default policy as it was, built from `wit/v0.1`) keeps loading and deciding steps exactly as
//! the 0.2.0 default does, has no `decide-request` (the host decides its journeys), and both pass
//! the conformance kit. The 0.2 default's `decide-request` is ParentBased over
//! `journey_sample_rate`, and a hostile `decide-request` is contained like any other call.

use std::sync::Arc;
use stepscope::policy::devkit::{conformance, native, synthetic};
use stepscope::policy::{
    ContractVersion, FaultKind, GUEST_COMPONENT_DIR, PolicyCounters, PolicyLimits, PolicyModule,
    PolicyOutcome, PolicyParams, PolicyRuntime, PolicySource,
};

fn module(name: &str) -> PolicyModule {
    let source = match name {
        "default" => PolicySource::BuiltinDefault,
        other => PolicySource::File(
            std::path::Path::new(GUEST_COMPONENT_DIR).join(format!("{other}.wasm")),
        ),
    };
    PolicyModule::load(&source, PolicyLimits::default()).unwrap()
}

fn runtime(name: &str, params: &PolicyParams) -> (PolicyRuntime, Arc<PolicyCounters>) {
    let counters = Arc::new(PolicyCounters::default());
    let runtime =
        PolicyRuntime::new(module(name), params.to_configure(), Arc::clone(&counters)).unwrap();
    (runtime, counters)
}

#[test]
fn a_0_1_component_loads_and_decides_steps_like_the_0_2_default() {
    assert_eq!(module("default").contract_version(), ContractVersion::V02);
    assert_eq!(
        module("default-v01").contract_version(),
        ContractVersion::V01
    );
    // The host passes journey_sample_rate to 0.2 only: the 0.1 default refuses unknown keys,
    // and still configures.
    let params = PolicyParams {
        journey_sample_rate: 0.4,
        ..PolicyParams::rates(0.3, 0.5)
    };
    let (mut new, _) = runtime("default", &params);
    let (mut old, old_counters) = runtime("default-v01", &params);
    for step in 1..=2_000 {
        let summary = synthetic::step_summary(9, step);
        let a = new.decide(&summary).answer().unwrap();
        let b = old.decide(&summary).answer().unwrap();
        assert_eq!(a, b, "step {step}");
        if a.emit_rich {
            let mut views = synthetic::request_views((step % 40) as usize, step);
            let before = format!("{views:?}");
            let p = new.plan_rich(&summary, &mut views).answer().unwrap();
            let q = old.plan_rich(&summary, &mut views).answer().unwrap();
            assert_eq!(p, q, "step {step}");
            // The 0.1 call borrowed the columns and put them back untouched.
            assert_eq!(format!("{views:?}"), before);
        }
    }
    assert_eq!(old_counters.snapshot().total_faults(), 0);
    // No decide-request in 0.1: the host decides.
    let arrival = synthetic::request_arrival(9, 1);
    assert!(old.decide_request(&arrival, 1).is_none());
    assert!(new.decide_request(&arrival, 1).is_some());
}

#[test]
fn the_0_2_default_decides_journeys_parent_based_over_the_rate() {
    let params = PolicyParams {
        journey_sample_rate: 0.3,
        ..PolicyParams::default()
    };
    let (mut runtime, counters) = runtime("default", &params);
    let (mut traced, mut parent_sampled, mut parent_unsampled) = (0, 0, 0);
    for id in 1..=4_000 {
        let arrival = synthetic::request_arrival(5, id);
        let answer = runtime
            .decide_request(&arrival, 1)
            .unwrap()
            .answer()
            .unwrap();
        assert_eq!(
            answer,
            native::default_decide_request(0.3, &arrival),
            "{arrival:?}"
        );
        traced += u32::from(answer.trace);
        match arrival.parent_sampled {
            Some(true) => {
                assert!(answer.trace);
                parent_sampled += 1;
            }
            Some(false) => {
                assert!(!answer.trace);
                parent_unsampled += 1;
            }
            None => assert_eq!(answer.trace, arrival.random < 0.3),
        }
    }
    assert!(parent_sampled > 500 && parent_unsampled > 500);
    assert!(traced > parent_sampled);
    assert_eq!(counters.snapshot().total_faults(), 0);
}

#[test]
fn both_versions_pass_the_conformance_kit() {
    for name in ["default", "default-v01", "pressure"] {
        let report = conformance::check(
            &module(name),
            &conformance::SuiteParams {
                params: PolicyParams::rates(0.5, 0.5).to_configure(),
                seed: 1,
                steps: 2_000,
                measure_latency: false,
                time_limit: std::time::Duration::from_secs(120),
            },
        )
        .unwrap();
        assert!(report.passed(), "{name}:\n{report}");
        let contract = &report.lines[0].detail;
        let line = report
            .lines
            .iter()
            .find(|l| l.name == "decide-request")
            .expect("a decide-request line");
        if name == "default-v01" {
            assert!(contract.contains("policy@0.1.0"), "{contract}");
            assert!(line.detail.contains("contract 0.1"), "{}", line.detail);
        } else {
            assert!(contract.contains("policy@0.2.0"), "{contract}");
            assert!(
                line.detail.contains("2000 synthetic arrivals"),
                "{}",
                line.detail
            );
        }
    }
}

#[test]
fn a_hostile_decide_request_is_contained_and_counted() {
    let limits = PolicyLimits {
        fuel_per_call: 5_000_000,
        max_backoff_steps: 4,
        ..PolicyLimits::default()
    };
    let hostile = std::path::Path::new(GUEST_COMPONENT_DIR).join("hostile.wasm");
    for (mode, kind) in [
        ("request-trap", FaultKind::Trap),
        ("request-loop", FaultKind::Timeout),
        ("request-bad-probability", FaultKind::Malformed),
    ] {
        let module = PolicyModule::load(&PolicySource::File(hostile.clone()), limits).unwrap();
        let counters = Arc::new(PolicyCounters::default());
        let mut runtime = PolicyRuntime::new(
            module,
            vec![("mode".into(), mode.into())],
            Arc::clone(&counters),
        )
        .unwrap();
        let mut faults = 0;
        for step in 1..=32 {
            let arrival = synthetic::request_arrival(2, step);
            match runtime.decide_request(&arrival, step).unwrap() {
                PolicyOutcome::Fault(k) => {
                    assert_eq!(k, kind, "{mode}");
                    faults += 1;
                }
                PolicyOutcome::BackingOff => {}
                PolicyOutcome::Answer(a) => panic!("{mode}: answered {a:?}"),
            }
            // Steps keep being decided between the faults (after the back-off).
            let _ = runtime.decide(&synthetic::step_summary(2, step));
        }
        assert!(faults >= 4, "{mode}: {faults}");
        assert_eq!(counters.snapshot().faults_of(kind), faults, "{mode}");
        assert!(counters.snapshot().skipped_backoff > 0, "{mode}");
    }
}
