//! Test-only policy, built for `wasm32-wasip2` (so it imports WASI through Rust's std), that
//! reports what its sandbox grants in the extra attributes of every decision:
//!
//! - `clock_ns`: nanoseconds since the Unix epoch by the wall clock (the host freezes it at 0);
//! - `env_args`: `<environment variables>/<arguments>` (the host grants none);
//! - `fs_net`: whether listing `/` and connecting to 127.0.0.1:9 worked (both must be denied);
//! - `random`: a hash keyed by std's randomly seeded `RandomState` (the host seeds WASI
//!   randomness with a constant, so every instance prints the same value).
//!
//! It also writes to stdout and stderr, which the host discards. Samples every step.

wit_bindgen::generate!({
    path: "../../../wit/v0.1",
    world: "step-policy",
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, RequestViews, RichPlan, SnapshotAttributes, StepDecision, StepSummary,
};
use std::hash::{BuildHasher, Hasher};

fn attr(key: &str, value: String) -> ExtraAttribute {
    ExtraAttribute {
        key: key.to_string(),
        value,
    }
}

fn allowed(ok: bool) -> &'static str {
    if ok { "allowed" } else { "denied" }
}

struct WasiProbe;

impl Guest for WasiProbe {
    fn configure(_params: Vec<(String, String)>) -> Result<(), String> {
        println!("configure: stdout is writable");
        eprintln!("configure: stderr is writable");
        Ok(())
    }

    fn decide(_summary: StepSummary) -> StepDecision {
        let clock_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(u128::MAX, |d| d.as_nanos());
        let env = std::env::vars_os().count();
        let args = std::env::args_os().count();
        let fs = std::fs::read_dir("/").is_ok();
        let net = std::net::TcpStream::connect("127.0.0.1:9").is_ok();
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(42);
        StepDecision {
            emit_batch: true,
            emit_rich: false,
            batch_probability: 1.0,
            rich_probability: 0.0,
            extra: vec![
                attr("clock_ns", clock_ns.to_string()),
                attr("env_args", format!("{env}/{args}")),
                attr("fs_net", format!("{}/{}", allowed(fs), allowed(net))),
                attr("random", format!("{:016x}", hasher.finish())),
            ],
        }
    }

    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        RichPlan {
            requests: (0..requests.request_id.len() as u32).collect(),
            attributes: SnapshotAttributes::all(),
            extra: Vec::new(),
        }
    }
}

export!(WasiProbe);
