// stepscope step-tracing policy template (JavaScript).
//
// This file is an ES module compiled into a WebAssembly component by ComponentizeJS
// (StarlingMonkey): `./build.sh` → build/policy.wasm. It implements the `policy` interface of
// the WIT world `stepscope:policy/step-policy@0.2.0` (see wit/policy.wit in the stepscope repo).
//
// As written it is exactly the built-in default policy: two-stage sampling. A step is
// batch-sampled when the host's batch draw is below `sample_rate`; a batch-sampled step is
// rich-sampled when the independent rich draw is below `rich_subsample_rate`. A rich step
// snapshots every running request with every attribute. A request's journey (with
// --enable-journey-tracing) is traced by OpenTelemetry's ParentBased rule over
// `journey_sample_rate`.
//
// How WIT maps to JavaScript here (ComponentizeJS 0.23):
//   * names are camelCase: `plan-rich` → `planRich`, `random-batch` → `randomBatch`,
//     `last-step-duration-us` → `lastStepDurationUs`.
//   * u64 values (stepId, tsEndNs, durationUs, lastStepDurationUs, requestId entries) arrive as
//     BigInt: convert with Number(x) before doing float arithmetic (exact below 2^53).
//     u32/u8/f64 values arrive as plain numbers.
//   * `result<_, string>`: return normally for `ok`; THROW a string for `err(message)`.
//   * `flags snapshot-attributes`: an object of booleans, e.g. { phase: true, ... }.
//   * lists: arrays (return plain arrays of numbers for list<u32>).
//   * `option<bool>` (parentSampled): the boolean, or undefined for none.
//
// The host calls `configure` once per instance, then `decide` once per scheduler step,
// `planRich` after each `decide` that returned emitRich, and `decideRequest` once per client
// request when journey tracing is on. Keep `decide` cheap: it runs on the
// scheduler's hot path. State kept in module variables persists across calls (one instance per
// engine), but the policy must stay deterministic: derive every decision from the inputs only
// (no Math.random(), no Date.now(); the build disables those WASI features anyway).

// ---- Parameters ---------------------------------------------------------------------------------
// The host always passes `sample_rate`, `rich_subsample_rate` and `journey_sample_rate` (from the
// flags), plus every `--step-tracing-policy-arg key=value`.
let sampleRate = 0.01;
let richSubsampleRate = 0.001;
let journeySampleRate = 1.0;

/** Parse a number in [0, 1]; throw an error string naming the key otherwise. */
function parseUnit(key, value) {
  const text = String(value).trim();
  // Number("") is 0 and Number("0x1") is 1: accept only plain decimal / exponent notation.
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text)) {
    throw `parameter \`${key}\`: \`${value}\` is not a number`;
  }
  const x = Number(text);
  if (!(x >= 0 && x <= 1)) {
    throw `parameter \`${key}\`: ${x} is outside [0, 1]`;
  }
  return x;
}

// Every snapshot attribute flag (the `snapshot-attributes` flags of the WIT).
const ALL_ATTRIBUTES = {
  phase: true,
  numPromptTokens: true,
  numComputedTokens: true,
  numOutputTokens: true,
  numPreemptions: true,
  scheduledTokens: true,
  kvBlocksAllocated: true,
  kvBlocksCached: true,
  effectivePromptLen: true,
};

export const policy = {
  /**
   * configure(params: list<tuple<string, string>>) -> result<_, string>
   * `params` is an array of [key, value] pairs. Throw a string to refuse the configuration.
   */
  configure(params) {
    for (const [key, value] of params) {
      switch (key) {
        case 'sample_rate':
          sampleRate = parseUnit(key, value);
          break;
        case 'rich_subsample_rate':
          richSubsampleRate = parseUnit(key, value);
          break;
        case 'journey_sample_rate':
          journeySampleRate = parseUnit(key, value);
          break;
        // ---- add your own parameters here ----
        default:
          throw `unknown parameter \`${key}\` (this policy takes sample_rate, rich_subsample_rate and journey_sample_rate)`;
      }
    }
  },

  /**
   * decide(summary: step-summary) -> step-decision, once per scheduler step.
   * ---- put your own per-step logic here (e.g. triggers on summary.numPreempted,
   * summary.kvUsageRatio, Number(summary.lastStepDurationUs)) ----
   */
  decide(summary) {
    const emitBatch = summary.randomBatch < sampleRate;
    const emitRich = emitBatch && summary.randomRich < richSubsampleRate;
    return {
      emitBatch,
      emitRich, // only ever true together with emitBatch
      batchProbability: sampleRate,
      richProbability: richSubsampleRate,
      extra: [], // up to 4 { key, value } string pairs, e.g. { key: 'reason', value: 'slow' }
    };
  },

  /**
   * planRich(summary, requests: request-views) -> rich-plan, after a decide with emitRich.
   * `requests` holds columns (requestId, isPrefill, numPromptTokens, ...), one entry per
   * running request. Return the indices to snapshot (each at most once).
   * ---- e.g. only requests queued longer than X (Number(requests.timeSinceArrivalUs[i])), or
   * always those whose journey is traced (requests.journeyTraced[i] === 1) ----
   */
  planRich(summary, requests) {
    const n = requests.requestId.length;
    const indices = new Array(n);
    for (let i = 0; i < n; i++) indices[i] = i;
    return { requests: indices, attributes: ALL_ATTRIBUTES, extra: [] };
  },

  /**
   * decideRequest(arrival: request-arrival) -> journey-decision, once per client request.
   * ParentBased: follow the caller's sampled flag when it sent a `traceparent`, else the host's
   * draw against journey_sample_rate.
   * ---- e.g. trace every request that arrives while arrival.kvUsageRatio is high ----
   */
  decideRequest(arrival) {
    const parent = arrival.parentSampled;
    if (parent !== undefined && parent !== null) {
      return { trace: Boolean(parent), probability: 1.0, extra: [] };
    }
    return { trace: arrival.random < journeySampleRate, probability: journeySampleRate, extra: [] };
  },
};
