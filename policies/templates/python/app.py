"""stepscope step-tracing policy template (Python).

`./build.sh` turns this module into a WebAssembly component (build/policy.wasm) with
componentize-py, which embeds CPython. The class `Policy` implements the `policy` interface of
the WIT world `stepscope:policy/step-policy@0.2.0` (wit/policy.wit); componentize-py generates
the `wit_world` bindings package it subclasses (see them with `./build.sh --bindings`).

As written it is exactly the built-in default policy: two-stage sampling. A step is batch-sampled
when the host's batch draw is below `sample_rate`; a batch-sampled step is rich-sampled when the
independent rich draw is below `rich_subsample_rate`. A rich step snapshots every running request
with every attribute. A request's journey (with --enable-journey-tracing) is traced by
OpenTelemetry's ParentBased rule over `journey_sample_rate`.

How WIT maps to Python here (componentize-py 0.25):
  * names are snake_case (`plan_rich`, `random_batch`, `last_step_duration_us`); records are
    dataclasses in `wit_world.exports.policy`; flags are `enum.Flag` classes.
  * u64 values (step_id, ts_*_ns, *_duration_us, request ids) are plain Python ints;
    `option<bool>` is `Optional[bool]`.
  * `result<_, string>`: return None for `ok`; RAISE `Err("message")` (from
    `componentize_py_types`) for `err(message)`.

The host calls `configure` once per instance, then `decide` once per scheduler step (keep it
cheap: it runs on the scheduler's hot path), `plan_rich` after each `decide` that returned
`emit_rich`, and `decide_request` once per client request when journey tracing is on. Module-level state persists across calls, but decisions must come from the inputs
only (no clock, no random module): the host links WASI to an empty, frozen context anyway.
"""

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

# ---- Parameters --------------------------------------------------------------------------------
# The host always passes `sample_rate`, `rich_subsample_rate` and `journey_sample_rate` (from the
# flags), plus every `--step-tracing-policy-arg key=value`.
sample_rate = 0.01
rich_subsample_rate = 0.001
journey_sample_rate = 1.0

# Every snapshot attribute flag.
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


def parse_unit(key: str, value: str) -> float:
    """A number in [0, 1]; raises Err naming the key otherwise (nan and inf are refused)."""
    try:
        x = float(value.strip())
    except ValueError:
        raise Err(f"parameter `{key}`: `{value}` is not a number")
    if not 0.0 <= x <= 1.0:
        raise Err(f"parameter `{key}`: {x} is outside [0, 1]")
    return x


class Policy(exports.Policy):
    def configure(self, params: List[Tuple[str, str]]) -> None:
        """configure(params) -> result<_, string>: raise Err(...) to refuse the policy."""
        global sample_rate, rich_subsample_rate, journey_sample_rate
        for key, value in params:
            if key == "sample_rate":
                sample_rate = parse_unit(key, value)
            elif key == "rich_subsample_rate":
                rich_subsample_rate = parse_unit(key, value)
            elif key == "journey_sample_rate":
                journey_sample_rate = parse_unit(key, value)
            # ---- add your own parameters here ----
            else:
                raise Err(
                    f"unknown parameter `{key}` (this policy takes sample_rate, "
                    "rich_subsample_rate and journey_sample_rate)"
                )

    def decide(self, summary: StepSummary) -> StepDecision:
        """One call per scheduler step.

        ---- put your own per-step logic here (e.g. triggers on summary.num_preempted,
        summary.kv_usage_ratio, summary.last_step_duration_us) ----
        """
        emit_batch = summary.random_batch < sample_rate
        return StepDecision(
            emit_batch=emit_batch,
            emit_rich=emit_batch and summary.random_rich < rich_subsample_rate,
            batch_probability=sample_rate,
            rich_probability=rich_subsample_rate,
            extra=[],  # at most 4 ExtraAttribute(key=..., value=...) (strings)
        )

    def plan_rich(self, summary: StepSummary, requests: RequestViews) -> RichPlan:
        """One call per rich step: which running requests to snapshot (columns, entry i of each
        list describes request i), with which attributes.

        ---- e.g. only requests queued longer than X (requests.time_since_arrival_us), or always
        those whose journey is traced (requests.journey_traced) ----
        """
        return RichPlan(
            requests=list(range(len(requests.request_id))),
            attributes=ALL_ATTRIBUTES,
            extra=[],
        )

    def decide_request(self, arrival: RequestArrival) -> JourneyDecision:
        """One call per client request (journey tracing on): trace its journey or not.

        ParentBased: follow the caller's sampled flag when it sent a `traceparent`, else the
        host's draw against journey_sample_rate.
        ---- e.g. trace every request that arrives while arrival.kv_usage_ratio is high ----
        """
        if arrival.parent_sampled is not None:
            return JourneyDecision(trace=arrival.parent_sampled, probability=1.0, extra=[])
        return JourneyDecision(
            trace=arrival.random < journey_sample_rate,
            probability=journey_sample_rate,
            extra=[],
        )
