/*
 * stepscope step-tracing policy template (C).
 *
 * Built into a WebAssembly component by ./build.sh → build/policy.wasm: wit-bindgen generates the
 * bindings for the WIT world `stepscope:policy/step-policy@0.2.0` (wit/policy.wit) into
 * build/gen/, clang compiles this file with them for wasm32-wasi (no main, no crt start files),
 * and `wasm-tools component new` wraps the core module into a component.
 *
 * As written it is exactly the built-in default policy: two-stage sampling. A step is
 * batch-sampled when the host's batch draw is below `sample_rate`; a batch-sampled step is
 * rich-sampled when the independent rich draw is below `rich_subsample_rate`. A rich step
 * snapshots every running request with every attribute. A request's journey (with
 * --enable-journey-tracing) is traced by OpenTelemetry's ParentBased rule over
 * `journey_sample_rate`.
 *
 * Memory rules of wit-bindgen's C bindings (the host calls `decide` millions of times, so a leak
 * per call matters):
 *   - Parameters that own memory (the `params` list of configure, the `requests` columns of
 *     plan-rich) belong to the callee: free them with the generated *_free helpers before
 *     returning. The step summary is plain data (the generated glue frees its buffer).
 *   - Returned lists and strings are freed with free() by the generated post-return functions
 *     once the host has copied them: allocate them with malloc / step_policy_string_dup, never
 *     point them at static or stack memory. Empty lists may be {NULL, 0}.
 *
 * u64 fields are uint64_t; f64 fields are double. A `result<_, string>` is returned as a bool
 * (true = ok) plus an out-parameter string for the error.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "step_policy.h"

/* wasi-libc's strtod reads its string through musl's FILE machinery, whose __toread() calls
 * __stdio_exit_needed() to make sure stdio gets flushed at exit; that links stdout/stderr and with
 * them the WASI preview-1 imports fd_write, fd_seek and fd_close, which a component built without
 * the preview-1 adapter cannot have. A policy never exits and never uses stdio, so this empty,
 * weak stand-in keeps those imports out (build.sh fails loudly if any preview-1 import is left).
 * Remove it if your libc does not need it; do not use printf/puts/fopen/exit in a policy. */
__attribute__((weak)) void __stdio_exit_needed(void) {}

/* Shorter names for the generated types. */
typedef exports_stepscope_policy_policy_step_summary_t step_summary_t;
typedef exports_stepscope_policy_policy_step_decision_t step_decision_t;
typedef exports_stepscope_policy_policy_request_views_t request_views_t;
typedef exports_stepscope_policy_policy_rich_plan_t rich_plan_t;
typedef exports_stepscope_policy_policy_request_arrival_t request_arrival_t;
typedef exports_stepscope_policy_policy_journey_decision_t journey_decision_t;

/* ---- Parameters -------------------------------------------------------------------------------
 * The host always passes `sample_rate`, `rich_subsample_rate` and `journey_sample_rate` (from the
 * flags), plus every `--step-tracing-policy-arg key=value`. The guest is single-threaded. */
static double sample_rate = 0.01;
static double rich_subsample_rate = 0.001;
static double journey_sample_rate = 1.0;

/* Every snapshot attribute flag. */
#define ALL_SNAPSHOT_ATTRIBUTES                                                                  \
  (EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_PHASE |                                   \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_NUM_PROMPT_TOKENS |                       \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_NUM_COMPUTED_TOKENS |                     \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_NUM_OUTPUT_TOKENS |                       \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_NUM_PREEMPTIONS |                         \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_SCHEDULED_TOKENS |                        \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_KV_BLOCKS_ALLOCATED |                     \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_KV_BLOCKS_CACHED |                        \
   EXPORTS_STEPSCOPE_POLICY_POLICY_SNAPSHOT_ATTRIBUTES_EFFECTIVE_PROMPT_LEN)

/* Set *err to a malloc'd copy of the message (the generated post-return frees it): the
 * concatenation of n_parts pieces. No printf: stdio would pull WASI preview-1 imports (fd_write,
 * fd_seek, fd_close) into the module. */
typedef struct { const char *ptr; size_t len; } piece_t;
#define LIT(s) ((piece_t){(s), sizeof(s) - 1})
/* A WIT string from the host, clipped to 64 bytes for the message. */
#define STR(wit_string)                                                                          \
  ((piece_t){(const char *)(wit_string).ptr, (wit_string).len > 64 ? 64 : (wit_string).len})

static bool fail(step_policy_string_t *err, const piece_t *parts, size_t n_parts) {
  size_t total = 0;
  for (size_t i = 0; i < n_parts; i++) total += parts[i].len;
  err->ptr = malloc(total ? total : 1);
  if (!err->ptr) abort();
  err->len = 0;
  for (size_t i = 0; i < n_parts; i++) {
    memcpy(err->ptr + err->len, parts[i].ptr, parts[i].len);
    err->len += parts[i].len;
  }
  return false;
}

static bool key_is(const step_policy_string_t *s, const char *key) {
  size_t n = strlen(key);
  return s->len == n && memcmp(s->ptr, key, n) == 0;
}

/* Parse a decimal number in [0, 1] (surrounding blanks allowed). Only digits, sign, '.', and an
 * exponent are accepted, so strtod never sees hex floats, "nan" or "inf"; the whole string must
 * be consumed. On error *err names the key. */
static bool parse_unit(const step_policy_tuple2_string_string_t *kv, double *out,
                       step_policy_string_t *err) {
  char buf[64];
  const char *p = (const char *)kv->f1.ptr;
  size_t len = kv->f1.len;
  while (len > 0 && (*p == ' ' || *p == '\t')) { p++; len--; }
  while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
  bool ok = len > 0 && len < sizeof buf;
  for (size_t i = 0; ok && i < len; i++) {
    ok = (p[i] >= '0' && p[i] <= '9') || strchr("+-.eE", p[i]) != NULL;
  }
  double x = 0.0;
  if (ok) {
    char *end;
    memcpy(buf, p, len);
    buf[len] = '\0';
    x = strtod(buf, &end);
    ok = end == buf + len;
  }
  if (!ok) {
    piece_t m[] = {LIT("parameter `"), STR(kv->f0), LIT("`: `"), STR(kv->f1), LIT("` is not a number")};
    return fail(err, m, sizeof m / sizeof m[0]);
  }
  if (!(x >= 0.0 && x <= 1.0)) {
    piece_t m[] = {LIT("parameter `"), STR(kv->f0), LIT("`: "), STR(kv->f1), LIT(" is outside [0, 1]")};
    return fail(err, m, sizeof m / sizeof m[0]);
  }
  *out = x;
  return true;
}

/* configure(params: list<tuple<string, string>>) -> result<_, string>
 * Return true for ok; false with *err set for err(message). */
bool exports_stepscope_policy_policy_configure(step_policy_list_tuple2_string_string_t *params,
                                               step_policy_string_t *err) {
  bool ok = true;
  for (size_t i = 0; ok && i < params->len; i++) {
    const step_policy_tuple2_string_string_t *kv = &params->ptr[i];
    if (key_is(&kv->f0, "sample_rate")) {
      ok = parse_unit(kv, &sample_rate, err);
    } else if (key_is(&kv->f0, "rich_subsample_rate")) {
      ok = parse_unit(kv, &rich_subsample_rate, err);
    } else if (key_is(&kv->f0, "journey_sample_rate")) {
      ok = parse_unit(kv, &journey_sample_rate, err);
    /* ---- add your own parameters here ---- */
    } else {
      piece_t m[] = {LIT("unknown parameter `"), STR(kv->f0),
                     LIT("` (this policy takes sample_rate, rich_subsample_rate and "
                         "journey_sample_rate)")};
      ok = fail(err, m, sizeof m / sizeof m[0]);
    }
  }
  step_policy_list_tuple2_string_string_free(params); /* the inputs are ours to free */
  return ok;
}

/* decide(summary: step-summary) -> step-decision, once per scheduler step.
 * ---- put your own per-step logic here (e.g. triggers on summary->num_preempted,
 * summary->kv_usage_ratio, summary->last_step_duration_us) ---- */
void exports_stepscope_policy_policy_decide(step_summary_t *summary, step_decision_t *ret) {
  bool emit_batch = summary->random_batch < sample_rate;
  ret->emit_batch = emit_batch;
  ret->emit_rich = emit_batch && summary->random_rich < rich_subsample_rate;
  ret->batch_probability = sample_rate;
  ret->rich_probability = rich_subsample_rate;
  /* No extra attributes. To add some (at most 4), malloc the array and each string
   * (step_policy_string_dup): the generated post-return frees them. */
  ret->extra.ptr = NULL;
  ret->extra.len = 0;
}

/* plan_rich(summary, requests) -> rich-plan, after a decide that returned emit_rich.
 * `requests` holds columns, entry i of each describing running request i.
 * ---- e.g. only requests queued longer than X (requests->time_since_arrival_us), or always
 * those whose journey is traced (requests->journey_traced) ---- */
void exports_stepscope_policy_policy_plan_rich(step_summary_t *summary, request_views_t *requests,
                                               rich_plan_t *ret) {
  (void)summary;
  size_t n = requests->request_id.len;
  ret->requests.ptr = n ? malloc(n * sizeof(uint32_t)) : NULL;
  if (n && !ret->requests.ptr) abort();
  for (size_t i = 0; i < n; i++) ret->requests.ptr[i] = (uint32_t)i;
  ret->requests.len = n;
  ret->attributes = ALL_SNAPSHOT_ATTRIBUTES;
  ret->extra.ptr = NULL;
  ret->extra.len = 0;
  exports_stepscope_policy_policy_request_views_free(requests); /* the inputs are ours to free */
}

/* decide_request(arrival) -> journey-decision, once per client request with journey tracing on.
 * The arrival is plain data. ParentBased: follow the caller's sampled flag when it sent a
 * `traceparent`, else the host's draw against journey_sample_rate.
 * ---- e.g. trace every request that arrives while arrival->kv_usage_ratio is high ---- */
void exports_stepscope_policy_policy_decide_request(request_arrival_t *arrival,
                                                    journey_decision_t *ret) {
  if (arrival->parent_sampled.is_some) {
    ret->trace = arrival->parent_sampled.val;
    ret->probability = 1.0;
  } else {
    ret->trace = arrival->random < journey_sample_rate;
    ret->probability = journey_sample_rate;
  }
  ret->extra.ptr = NULL;
  ret->extra.len = 0;
}
