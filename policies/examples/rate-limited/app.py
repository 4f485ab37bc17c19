"""Example step-tracing policy (Python): trace at most N steps per second, whatever the step rate.

Candidates: a step is a candidate when the host's batch draw `random_batch < sample_rate`
(pass `--step-tracing-sample-rate 1` to make every step a candidate). Admission: a token bucket
of capacity `burst`, starting full and refilled at `max_steps_per_second` tokens per second of
*step time*, admits a candidate when it holds at least one token (and takes it). Step time is
the summary's `ts_end_ns`: the policy never reads a clock, so it is a pure function of the step
sequence (the same steps give the same decisions). If `ts_end_ns` goes backwards (a wall-clock
step), that interval adds nothing to the bucket. So over any interval of T seconds of step time at
most `burst + max_steps_per_second × T` steps are traced.

An admitted step is rich-sampled when `random_rich < rich_subsample_rate`; its rich plan
snapshots every running request with every attribute.

Recorded batch probability: `sample_rate × admitted / candidates` over the last 256 candidate
steps (this one included): an estimate of the chance that a step like this one was traced, so
span counts can be re-weighted. It is exact when the step rate is steady over the window.

Parameters (`--step-tracing-policy-arg key=value`; unknown keys are refused):
  max_steps_per_second  token refill rate, > 0 (default 10)
  burst                 bucket capacity, >= 1 (default: max(1, max_steps_per_second))
  sample_rate           candidate probability, [0, 1] (default 1.0; the host always passes
                        `--step-tracing-sample-rate`, 0.01 unless set)
  rich_subsample_rate   rich probability among admitted steps, [0, 1] (default 0.001; the host
                        always passes `--step-tracing-rich-subsample-rate`)
  journey_sample_rate   journey probability, [0, 1] (the host always passes
                        `--journey-tracing-sample-rate`, 1.0 unless set)

Journeys (`decide_request`, with --enable-journey-tracing): the default's ParentBased rule over
`journey_sample_rate` (the caller's sampled flag when it sent a `traceparent`, else the host's
draw against the rate); steps, not requests, are what this policy rate-limits.

Extra span attributes of an admitted step: `reason` = `rate_limited`, `tokens_left` (the bucket
after this step took its token, 3 decimals).

WIT <-> Python (componentize-py 0.25): snake_case names, u64 fields are ints, and `configure`
reports err(message) by raising `componentize_py_types.Err(message)`.
"""

import math
from typing import List, Tuple

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.policy import (
    ExtraAttribute,
    JourneyDecision,
    RequestArrival,
    RequestViews,
    RichPlan,
    SnapshotAttributes,
    StepDecision,
    StepSummary,
)

WINDOW = 256  # candidate steps in the batch-probability estimate
NOT_TRACED = StepDecision(False, False, 0.0, 0.0, [])

ALL_ATTRIBUTES = (
    SnapshotAttributes.PHASE
    | SnapshotAttributes.NUM_PROMPT_TOKENS
    | SnapshotAttributes.NUM_COMPUTED_TOKENS
    | SnapshotAttributes.NUM_OUTPUT_TOKENS
    | SnapshotAttributes.NUM_PREEMPTIONS
    | SnapshotAttributes.SCHEDULED_TOKENS
    | SnapshotAttributes.KV_BLOCKS_ALLOCATED
    | SnapshotAttributes.KV_BLOCKS_CACHED
    | SnapshotAttributes.EFFECTIVE_PROMPT_LEN
)

# ---- configuration ------------------------------------------------------------------------------
sample_rate = 1.0
rich_subsample_rate = 0.001
journey_sample_rate = 1.0
max_steps_per_second = 10.0
burst = 10.0

# ---- state --------------------------------------------------------------------------------------
tokens = burst  # the bucket (starts full)
last_ts_ns = None  # ts_end_ns of the last refill
outcomes = [False] * WINDOW  # ring of the last WINDOW candidates: admitted or not
outcome_head = 0
outcome_count = 0  # filled entries (<= WINDOW)
admitted_in_window = 0


def parse_number(key: str, value: str) -> float:
    try:
        x = float(value.strip())
    except ValueError:
        raise Err(f"parameter `{key}`: `{value}` is not a number")
    if not math.isfinite(x):
        raise Err(f"parameter `{key}`: `{value}` is not a finite number")
    return x


def parse_unit(key: str, value: str) -> float:
    x = parse_number(key, value)
    if not 0.0 <= x <= 1.0:
        raise Err(f"parameter `{key}`: {x} is outside [0, 1]")
    return x


def record(admitted: bool) -> float:
    """Record a candidate's outcome; return admitted / candidates over the window."""
    global outcome_head, outcome_count, admitted_in_window
    if outcome_count == WINDOW:
        admitted_in_window -= outcomes[outcome_head]
    else:
        outcome_count += 1
    outcomes[outcome_head] = admitted
    admitted_in_window += admitted
    outcome_head = (outcome_head + 1) % WINDOW
    return admitted_in_window / outcome_count


class Policy(exports.Policy):
    def configure(self, params: List[Tuple[str, str]]) -> None:
        global sample_rate, rich_subsample_rate, max_steps_per_second, burst, tokens, last_ts_ns
        global journey_sample_rate
        global outcomes, outcome_head, outcome_count, admitted_in_window
        # Parse everything first, so a refused configuration changes nothing.
        sr, rr, rate, cap = sample_rate, rich_subsample_rate, max_steps_per_second, None
        jr = journey_sample_rate
        for key, value in params:
            if key == "sample_rate":
                sr = parse_unit(key, value)
            elif key == "rich_subsample_rate":
                rr = parse_unit(key, value)
            elif key == "journey_sample_rate":
                jr = parse_unit(key, value)
            elif key == "max_steps_per_second":
                rate = parse_number(key, value)
                if not 0.0 < rate <= 1e9:
                    raise Err(f"parameter `{key}`: {rate} is outside (0, 1e9]")
            elif key == "burst":
                cap = parse_number(key, value)
                if not 1.0 <= cap <= 1e9:
                    raise Err(f"parameter `{key}`: {cap} is outside [1, 1e9]")
            else:
                raise Err(
                    f"unknown parameter `{key}` (the rate-limited policy takes "
                    "max_steps_per_second, burst, sample_rate, rich_subsample_rate, "
                    "journey_sample_rate)"
                )
        sample_rate, rich_subsample_rate, max_steps_per_second = sr, rr, rate
        journey_sample_rate = jr
        burst = cap if cap is not None else max(1.0, rate)
        tokens, last_ts_ns = burst, None
        outcomes, outcome_head, outcome_count, admitted_in_window = [False] * WINDOW, 0, 0, 0

    def decide(self, summary: StepSummary) -> StepDecision:
        global tokens, last_ts_ns
        if not summary.random_batch < sample_rate:
            return NOT_TRACED  # not a candidate
        ts = summary.ts_end_ns  # a Python int: no u64 overflow concerns
        if last_ts_ns is not None and ts > last_ts_ns:
            tokens = min(burst, tokens + (ts - last_ts_ns) * max_steps_per_second / 1e9)
        last_ts_ns = ts
        admitted = tokens >= 1.0
        if admitted:
            tokens -= 1.0
        fraction = record(admitted)
        if not admitted:
            return NOT_TRACED
        return StepDecision(
            emit_batch=True,
            emit_rich=summary.random_rich < rich_subsample_rate,
            batch_probability=sample_rate * fraction,
            rich_probability=rich_subsample_rate,
            extra=[
                ExtraAttribute("reason", "rate_limited"),
                ExtraAttribute("tokens_left", f"{tokens:.3f}"),
            ],
        )

    def plan_rich(self, summary: StepSummary, requests: RequestViews) -> RichPlan:
        return RichPlan(list(range(len(requests.request_id))), ALL_ATTRIBUTES, [])

    def decide_request(self, arrival: RequestArrival) -> JourneyDecision:
        if arrival.parent_sampled is not None:
            return JourneyDecision(arrival.parent_sampled, 1.0, [])
        return JourneyDecision(arrival.random < journey_sample_rate, journey_sample_rate, [])
