// Example step-tracing policy (JavaScript): trace the slow steps, the tail of the step-latency
// distribution, with their requests.
//
// The policy estimates a latency percentile (default p99) over a sliding window of recent step
// durations and traces every step whose duration lies above it, batch and rich (probability
// 1.0), so the requests of a slow step are visible. Other steps fall back to the default
// two-stage sampling at `sample_rate` / `rich_subsample_rate`.
//
// Duration used (`metric`):
//   * `last_step_duration_us` (default): wall time of the previous whole engine step (schedule,
//     forward, sample, update). The host reports it at the next step, so a slow engine step is
//     traced at the step right after it: the running requests are then (nearly) the same ones
//     that were in the slow step. 0 for the first step; zeros are ignored (neither recorded nor
//     triggering).
//   * `duration_us`: the scheduler's own share of this step (schedule() only).
//
// Threshold estimate: a ring buffer holds the last `window` non-zero durations. The threshold is
// the nearest-rank percentile of the buffer (the ceil(percentile × n)-th smallest value),
// recomputed from a sorted copy when warm-up ends and then every 32 recorded durations (so the
// sort costs O(window log window / 32) per step on average). A step triggers when at least
// `min_samples` durations have been recorded and its duration is strictly above the threshold;
// the step's own duration is compared first, then recorded. Everything derives from the inputs
// (no clock, no Math.random()), so two instances fed the same steps decide the same.
//
// Journeys (`decideRequest`, with --enable-journey-tracing): the default's ParentBased rule over
// `journey_sample_rate`.
//
// Parameters (`--step-tracing-policy-arg key=value`; unknown keys are refused):
//   sample_rate          base batch probability for non-triggered steps, [0, 1] (default 0.01)
//   rich_subsample_rate  base rich probability among batch-sampled steps, [0, 1] (default 0.001)
//   journey_sample_rate  journey probability, [0, 1] (default 1.0; the host always passes it)
//   percentile           the tail threshold, in (0, 1) (default 0.99)
//   window               recent durations kept, integer in [1, 1048576] (default 1024)
//   min_samples          warm-up before triggering, integer in [1, window] (default 64)
//   metric               last_step_duration_us (default) or duration_us
//
// Extra span attributes: reason (`tail_latency` or `base_rate`); for a trigger also
// threshold_us and duration_us.
//
// WIT ↔ JS (ComponentizeJS 0.23): camelCase names; u64 fields are BigInt (Number(...) before
// arithmetic); `configure` reports err(message) by throwing a string.

const RECOMPUTE_EVERY = 32;
const MAX_WINDOW = 1 << 20;

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

// ---- configuration ------------------------------------------------------------------------------
let sampleRate = 0.01;
let richSubsampleRate = 0.001;
let journeySampleRate = 1.0;
let percentile = 0.99;
let minSamples = 64;
let useLastStep = true;

// ---- estimator state ----------------------------------------------------------------------------
let ring = new Float64Array(1024); // the last `ring.length` non-zero durations (µs)
let head = 0; // next slot to write
let count = 0; // filled slots (≤ ring.length)
let sinceRecompute = 0; // durations recorded since the threshold was last computed
let threshold = Infinity; // current percentile estimate (µs); Infinity during warm-up

function parseNumber(key, value) {
  const text = String(value).trim();
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text)) {
    throw `parameter \`${key}\`: \`${value}\` is not a number`;
  }
  return Number(text);
}

function parseUnit(key, value) {
  const x = parseNumber(key, value);
  if (!(x >= 0 && x <= 1)) throw `parameter \`${key}\`: ${x} is outside [0, 1]`;
  return x;
}

function parseCount(key, value, min, max) {
  const text = String(value).trim();
  if (!/^\d+$/.test(text)) throw `parameter \`${key}\`: \`${value}\` is not a non-negative integer`;
  const n = Number(text);
  if (n < min || n > max) throw `parameter \`${key}\`: ${text} is outside [${min}, ${max}]`;
  return n;
}

function recompute() {
  const sorted = ring.slice(0, count).sort(); // typed-array sort: numeric, ascending
  const rank = Math.max(1, Math.ceil(percentile * count)); // nearest rank, 1-based
  threshold = sorted[rank - 1];
  sinceRecompute = 0;
}

/** Record one non-zero duration, refreshing the threshold when due. */
function record(d) {
  ring[head] = d;
  head = head + 1 === ring.length ? 0 : head + 1;
  if (count < ring.length) count++;
  sinceRecompute++;
  if (count >= minSamples && (threshold === Infinity || sinceRecompute >= RECOMPUTE_EVERY)) {
    recompute();
  }
}

export const policy = {
  configure(params) {
    // Parse everything first, so a refused configuration changes nothing.
    let sr = sampleRate, rr = richSubsampleRate, pc = percentile, win = ring.length;
    let ms = minSamples, last = useLastStep, msGiven = false, jr = journeySampleRate;
    for (const [key, value] of params) {
      switch (key) {
        case 'sample_rate': sr = parseUnit(key, value); break;
        case 'rich_subsample_rate': rr = parseUnit(key, value); break;
        case 'journey_sample_rate': jr = parseUnit(key, value); break;
        case 'percentile':
          pc = parseNumber(key, value);
          if (!(pc > 0 && pc < 1)) throw `parameter \`${key}\`: ${pc} is outside (0, 1)`;
          break;
        case 'window': win = parseCount(key, value, 1, MAX_WINDOW); break;
        case 'min_samples': ms = parseCount(key, value, 1, MAX_WINDOW); msGiven = true; break;
        case 'metric': {
          const m = String(value).trim();
          if (m === 'last_step_duration_us') last = true;
          else if (m === 'duration_us') last = false;
          else throw `parameter \`${key}\`: \`${value}\` is not last_step_duration_us or duration_us`;
          break;
        }
        default:
          throw `unknown parameter \`${key}\` (the tail-latency policy takes sample_rate, ` +
            'rich_subsample_rate, journey_sample_rate, percentile, window, min_samples, metric)';
      }
    }
    if (ms > win) {
      if (msGiven) throw `parameter \`min_samples\`: ${ms} is larger than window (${win})`;
      ms = win; // only the default was too large for a small window
    }
    sampleRate = sr; richSubsampleRate = rr; percentile = pc; minSamples = ms; useLastStep = last;
    journeySampleRate = jr;
    ring = new Float64Array(win);
    head = 0; count = 0; sinceRecompute = 0; threshold = Infinity;
  },

  decide(summary) {
    const d = Number(useLastStep ? summary.lastStepDurationUs : summary.durationUs);
    if (d > 0) {
      const slow = d > threshold; // against the estimate from earlier steps
      const thresholdAtStep = threshold;
      record(d);
      if (slow) {
        const rich = summary.runningDepth > 0;
        return {
          emitBatch: true,
          emitRich: rich,
          batchProbability: 1.0,
          richProbability: rich ? 1.0 : 0.0,
          extra: [
            { key: 'reason', value: 'tail_latency' },
            { key: 'threshold_us', value: String(thresholdAtStep) },
            { key: 'duration_us', value: String(d) },
          ],
        };
      }
    }
    const emitBatch = summary.randomBatch < sampleRate;
    return {
      emitBatch,
      emitRich: emitBatch && summary.randomRich < richSubsampleRate,
      batchProbability: sampleRate,
      richProbability: richSubsampleRate,
      extra: emitBatch ? [{ key: 'reason', value: 'base_rate' }] : [],
    };
  },

  planRich(summary, requests) {
    const n = requests.requestId.length;
    const indices = new Array(n);
    for (let i = 0; i < n; i++) indices[i] = i;
    return { requests: indices, attributes: ALL_ATTRIBUTES, extra: [] };
  },

  decideRequest(arrival) {
    const parent = arrival.parentSampled;
    if (parent !== undefined && parent !== null) {
      return { trace: Boolean(parent), probability: 1.0, extra: [] };
    }
    return { trace: arrival.random < journeySampleRate, probability: journeySampleRate, extra: [] };
  },
};
