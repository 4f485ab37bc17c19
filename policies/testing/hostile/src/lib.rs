//! A deliberately hostile policy for the host's sandbox tests.
//!
//! `configure` takes `mode=…` and every later call misbehaves that way: `loop` spins forever,
//! `memory` allocates until the memory cap, `leak` keeps 1 MiB more on every call (a heap that
//! only grows, as a JavaScript engine's), `trap` hits `unreachable`, `out-of-range` names a
//! request index past the end, `huge-list` returns 200,000 indices, `duplicate` names one
//! request twice, `bad-probability` returns NaN, `rich-without-batch` asks for snapshots of an
//! unsampled step, `long-extra` returns an oversized extra attribute, and `ok` behaves (samples
//! everything). The misbehaviour happens in `decide` for `loop`, `memory`, `leak`, `trap`,
//! `bad-probability`, `rich-without-batch` and `long-extra`, and in `plan-rich` otherwise.
//! `request-loop`, `request-trap` and `request-bad-probability` misbehave in `decide-request`
//! only (steps are sampled normally); every other mode traces every journey.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "step-policy",
});

use exports::stepscope::policy::policy::{
    ExtraAttribute, Guest, JourneyDecision, RequestArrival, RequestViews, RichPlan,
    SnapshotAttributes, StepDecision, StepSummary,
};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Clone, Copy, PartialEq)]
#[repr(u32)]
enum Mode {
    Ok = 0,
    Loop,
    Memory,
    Trap,
    OutOfRange,
    HugeList,
    Duplicate,
    BadProbability,
    RichWithoutBatch,
    LongExtra,
    Leak,
    RequestLoop,
    RequestTrap,
    RequestBadProbability,
}

static MODE: AtomicU32 = AtomicU32::new(Mode::Ok as u32);

fn mode() -> Mode {
    const ALL: [Mode; 14] = [
        Mode::Ok,
        Mode::Loop,
        Mode::Memory,
        Mode::Trap,
        Mode::OutOfRange,
        Mode::HugeList,
        Mode::Duplicate,
        Mode::BadProbability,
        Mode::RichWithoutBatch,
        Mode::LongExtra,
        Mode::Leak,
        Mode::RequestLoop,
        Mode::RequestTrap,
        Mode::RequestBadProbability,
    ];
    ALL[MODE.load(Ordering::Relaxed) as usize]
}

struct Hostile;

impl Guest for Hostile {
    fn configure(params: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in params {
            if key != "mode" {
                continue;
            }
            let mode = match value.as_str() {
                "ok" => Mode::Ok,
                "loop" => Mode::Loop,
                "memory" => Mode::Memory,
                "trap" => Mode::Trap,
                "out-of-range" => Mode::OutOfRange,
                "huge-list" => Mode::HugeList,
                "duplicate" => Mode::Duplicate,
                "bad-probability" => Mode::BadProbability,
                "rich-without-batch" => Mode::RichWithoutBatch,
                "long-extra" => Mode::LongExtra,
                "leak" => Mode::Leak,
                "request-loop" => Mode::RequestLoop,
                "request-trap" => Mode::RequestTrap,
                "request-bad-probability" => Mode::RequestBadProbability,
                "fail-configure" => return Err("configure refused on purpose".to_string()),
                other => return Err(format!("unknown mode `{other}`")),
            };
            MODE.store(mode as u32, Ordering::Relaxed);
        }
        Ok(())
    }

    fn decide(summary: StepSummary) -> StepDecision {
        let mut decision = StepDecision {
            emit_batch: true,
            emit_rich: true,
            batch_probability: 1.0,
            rich_probability: 1.0,
            extra: Vec::new(),
        };
        match mode() {
            Mode::Loop => {
                let mut x = summary.step_id;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            Mode::Memory => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(Vec::<u8>::with_capacity(1 << 20)));
                }
            }
            Mode::Leak => {
                let block: &'static mut [u8] = Vec::leak(vec![1u8; 1 << 20]);
                std::hint::black_box(block);
            }
            Mode::Trap => core::arch::wasm32::unreachable(),
            Mode::BadProbability => decision.batch_probability = f64::NAN,
            Mode::RichWithoutBatch => decision.emit_batch = false,
            Mode::LongExtra => decision.extra.push(ExtraAttribute {
                key: "reason".to_string(),
                value: "x".repeat(100_000),
            }),
            _ => {}
        }
        decision
    }

    fn plan_rich(_summary: StepSummary, requests: RequestViews) -> RichPlan {
        let n = requests.request_id.len() as u32;
        let requests = match mode() {
            Mode::OutOfRange => vec![n + 7],
            Mode::HugeList => (0..200_000u32).collect(),
            Mode::Duplicate if n > 0 => vec![0, 0],
            _ => (0..n).collect(),
        };
        RichPlan {
            requests,
            attributes: SnapshotAttributes::all(),
            extra: Vec::new(),
        }
    }

    fn decide_request(arrival: RequestArrival) -> JourneyDecision {
        let mut decision = JourneyDecision {
            trace: true,
            probability: 1.0,
            extra: Vec::new(),
        };
        match mode() {
            Mode::RequestLoop => {
                let mut x = arrival.request_id;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            Mode::RequestTrap => core::arch::wasm32::unreachable(),
            Mode::RequestBadProbability => decision.probability = 2.0,
            _ => {}
        }
        decision
    }
}

export!(Hostile);
