//! Test-only policy that imports a host function (`example:host-import/clock`) besides
//! exporting the policy interface. Policies get no host functions, so the host must refuse it
//! at load time and name the import.

wit_bindgen::generate!({
    path: "wit",
    world: "policy-with-clock",
});

use exports::stepscope::policy::policy::{
    Guest, RequestViews, RichPlan, SnapshotAttributes, StepDecision, StepSummary,
};

struct HostImport;

impl Guest for HostImport {
    fn configure(_params: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn decide(_summary: StepSummary) -> StepDecision {
        StepDecision {
            emit_batch: example::host_import::clock::now_ns() % 2 == 0,
            emit_rich: false,
            batch_probability: 0.5,
            rich_probability: 0.0,
            extra: Vec::new(),
        }
    }

    fn plan_rich(_summary: StepSummary, _requests: RequestViews) -> RichPlan {
        RichPlan {
            requests: Vec::new(),
            attributes: SnapshotAttributes::empty(),
            extra: Vec::new(),
        }
    }
}

export!(HostImport);
