//! Synthetic step streams for `policy run`, `policy check`, benchmarks and tests.
//!
//! The numbers look like a busy engine (varying queue depths, KV pressure, occasional
//! preemptions); the per-step draws come from [`crate::policy::random::step_draws`] exactly as in the
//! engine, so a policy's observed rates over a synthetic stream match what it would do live.

use crate::policy::bindings::{RequestViews, StepSummary};
use crate::policy::random::step_draws;
use crate::splitmix::mix64;

/// The summary of synthetic step `step_id` (1-based) under `seed`.
pub fn step_summary(seed: u64, step_id: u64) -> StepSummary {
    let (random_batch, random_rich) = step_draws(seed, step_id);
    let noise = mix64(step_id ^ 0x5eed_5eed);
    let running = 1 + (noise % 256) as u32;
    let waiting = ((noise >> 8) % 32) as u32;
    let num_prefill = ((noise >> 16) % 4).min(running as u64) as u32;
    let num_decode = running - num_prefill;
    let prefill_tokens = num_prefill * (1 + ((noise >> 20) % 512) as u32);
    let total_blocks = 4096u32;
    let free_blocks = ((noise >> 32) % total_blocks as u64) as u32;
    let ts_start_ns = 1_700_000_000_000_000_000 + step_id * 20_000_000;
    let duration_us = 50 + (noise >> 44) % 500;
    StepSummary {
        step_id,
        ts_start_ns,
        ts_end_ns: ts_start_ns + duration_us * 1000,
        duration_us,
        last_step_duration_us: 10_000 + (noise >> 50) % 20_000,
        running_depth: running,
        waiting_depth: waiting,
        num_prefill_reqs: num_prefill,
        num_decode_reqs: num_decode,
        scheduled_tokens: prefill_tokens + num_decode,
        prefill_tokens,
        decode_tokens: num_decode,
        num_finished: ((noise >> 40) % 3) as u32,
        num_preempted: u32::from((noise >> 56).is_multiple_of(50)),
        kv_blocks_total: total_blocks,
        kv_blocks_free: free_blocks,
        kv_usage_ratio: 1.0 - free_blocks as f64 / total_blocks as f64,
        random_batch,
        random_rich,
    }
}

/// `n` synthetic running-request views (columns).
pub fn request_views(n: usize, step_id: u64) -> RequestViews {
    let mut views = RequestViews {
        request_id: Vec::with_capacity(n),
        is_prefill: Vec::with_capacity(n),
        num_prompt_tokens: Vec::with_capacity(n),
        num_computed_tokens: Vec::with_capacity(n),
        num_output_tokens: Vec::with_capacity(n),
        num_preemptions: Vec::with_capacity(n),
        scheduled_tokens: Vec::with_capacity(n),
        kv_blocks_allocated: Vec::with_capacity(n),
        kv_blocks_cached: Vec::with_capacity(n),
        num_cached_tokens: Vec::with_capacity(n),
        time_since_arrival_us: Vec::with_capacity(n),
        max_tokens: Vec::with_capacity(n),
        journey_traced: Vec::with_capacity(n),
    };
    for i in 0..n as u64 {
        let noise = mix64(step_id.wrapping_mul(1_000_003) ^ i);
        let prompt = 16 + (noise % 2000) as u32;
        let output = ((noise >> 12) % 300) as u32;
        let prefill = output == 0;
        let computed = if prefill {
            prompt / 2
        } else {
            prompt + output - 1
        };
        let allocated = computed.div_ceil(16) + 1;
        views.request_id.push(step_id * 10_000 + i);
        views.is_prefill.push(u8::from(prefill));
        views.num_prompt_tokens.push(prompt);
        views.num_computed_tokens.push(computed);
        views.num_output_tokens.push(output);
        views.num_preemptions.push(((noise >> 24) % 2) as u32);
        views.scheduled_tokens.push(if prefill { 256 } else { 1 });
        views.kv_blocks_allocated.push(allocated);
        views.kv_blocks_cached.push(allocated / 2);
        views
            .num_cached_tokens
            .push(((noise >> 32) % 4) as u32 * 16);
        views.time_since_arrival_us.push((noise >> 40) % 30_000_000);
        views
            .max_tokens
            .push(output + 1 + ((noise >> 48) % 512) as u32);
        views.journey_traced.push(u8::from((noise >> 60) & 1 == 1));
    }
    views
}

/// A reproducible synthetic `decide-request` input for request `request_id` (`random` is the
/// host's draw for it under `seed`).
pub fn request_arrival(seed: u64, request_id: u64) -> crate::policy::RequestArrival {
    let noise = mix64(request_id.wrapping_mul(0x9E37) ^ 0x5EED);
    let parent_sampled = match noise % 4 {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    };
    crate::policy::RequestArrival {
        request_id,
        prompt_tokens: 1 + ((noise >> 8) % 4000) as u32,
        max_tokens: 1 + ((noise >> 20) % 1024) as u32,
        temperature: ((noise >> 32) % 200) as f64 / 100.0,
        num_choices: 1 + ((noise >> 40) % 4) as u32,
        parent_sampled,
        running_depth: ((noise >> 44) % 256) as u32,
        waiting_depth: ((noise >> 52) % 64) as u32,
        kv_usage_ratio: ((noise >> 56) % 101) as f64 / 100.0,
        random: crate::policy::random::journey_draw(seed, request_id),
    }
}
