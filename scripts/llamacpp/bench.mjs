// CPU throughput of llama.cpp (the prebuilt CPU binary shipped by node-llama-cpp@3.22.1) on a GGUF,
// with exactly --threads threads (default 2). Not part of CI.
//
//   node scripts/llamacpp/bench.mjs MODEL.gguf [--threads 2] [--json] [--prompt-len 128]
//        [--new-tokens 32] [--batch 16] [--seed 1234]
//
// Measures, after one untimed warm-up run of the same work:
//   batch 1 : prefill = one sequence, a --prompt-len prompt of random token ids (seeded), evaluated
//             in ONE llama_decode (context batch size >= prompt length); tokens/s = prompt_len/time.
//             decode  = then --new-tokens greedy tokens, one llama_decode of 1 token each;
//             tokens/s = new_tokens/time.
// "time" is the time spent inside llama_decode (node-llama-cpp's native call, measured from the
// call to its completion), so JavaScript, sampling and scheduling overheads are not charged to
// llama.cpp; the wall-clock figures are reported next to them (*_wall_tokens_per_s).
//   batch 16: 16 sequences in one context, each with its own random prompt; prefill = all 16 prompts
//             evaluated together (one llama_decode of 16*prompt_len tokens);
//             decode = --new-tokens steps in which all 16 sequences advance together;
//             tokens/s = 16*new_tokens/time.
// node-llama-cpp queues the concurrent evaluations of a context's sequences and dispatches them as
// one batch. This script checks that this really happened: it counts the llama_decode calls and
// their token counts (and the sequences per batch seen by the batching strategy) in the timed
// window, and fails when decode was not 1 call of B tokens per step.
//
// Output: with --json, one line per batch size on stdout:
//   {"engine":"llama.cpp","model":FILE,"batch_size":B,"prompt_len":128,
//    "prefill_tokens_per_s":X,"decode_tokens_per_s":Y, ...}
// (plus a few extra keys: threads, new_tokens, llama_decode_calls, other_cpu_load = the share of
// all CPUs that OTHER processes used during the timed runs; > 0.05 prints a warning to stderr,
// since on a 2-core machine any competing process ruins llama.cpp's timings); diagnostics go to
// stderr.
// Needs scripts/setup-llamacpp.sh to have run.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { loadLlama, NLC_DIR } from "./lib.mjs";
import { pathToFileURL } from "node:url";

function parseArgs(argv) {
  const o = { threads: 2, json: false, promptLen: 128, newTokens: 32, batch: 16, seed: 1234, model: null };
  const num = (v, name) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`${name} must be a positive integer`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--threads") o.threads = num(argv[++i], a);
    else if (a === "--json") o.json = true;
    else if (a === "--prompt-len") o.promptLen = num(argv[++i], a);
    else if (a === "--new-tokens") o.newTokens = num(argv[++i], a);
    else if (a === "--batch") o.batch = num(argv[++i], a);
    else if (a === "--seed") o.seed = num(argv[++i], a);
    else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else if (o.model == null) o.model = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  if (o.model == null) throw new Error("usage: node bench.mjs MODEL.gguf [--threads 2] [--json]");
  return o;
}

// mulberry32: small seeded PRNG, so prompts are the same on every run.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const args = parseArgs(process.argv.slice(2));
const log = (msg) => process.stderr.write(`[bench.mjs] ${msg}\n`);
const now = () => Number(process.hrtime.bigint()) / 1e9;

// Contention check: CPU time the rest of the machine used while we measured, as a fraction of
// all cores (from /proc/stat minus this process's own CPU time). On a 2-core machine anything
// else running (a compiler, say) makes llama.cpp's spinning threads wait, and the numbers are void.
const CLK_TCK = 100; // USER_HZ on Linux
function machineBusySeconds() {
  const f = fs.readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = f;
  return (user + nice + system + irq + softirq + (steal ?? 0)) / CLK_TCK;
}
const nCpu = os.availableParallelism?.() ?? os.cpus().length;
function loadProbe() {
  const t = now(), busy = machineBusySeconds(), own = process.cpuUsage();
  return () => {
    const wall = now() - t;
    const d = process.cpuUsage(own);
    const ownDelta = (d.user + d.system) / 1e6;
    return Math.max(0, (machineBusySeconds() - busy - ownDelta) / (wall * nCpu));
  };
}

const { llama, info } = await loadLlama({ maxThreads: args.threads });
const { maximumParallelismStrategy } = await import(pathToFileURL(path.join(NLC_DIR, "dist", "evaluator", "LlamaContext",
  "utils", "batchItemsPrioritizationStrategies", "maximumParallelismStrategy.js")).href);
const model = await llama.loadModel({ modelPath: args.model, gpuLayers: 0 });
const nVocab = model.fileInfo.metadata?.[model.fileInfo.metadata?.general?.architecture]?.vocab_size
  ?? model.tokens?.length ?? 32000;
const random = rng(args.seed);
// Token ids drawn from the vocabulary, avoiding the first 256 (special/control tokens live there).
const randomPrompt = () => Array.from({ length: args.promptLen }, () => 256 + Math.floor(random() * (nVocab - 256)));

/** One context with `nSeq` sequences; records every batch node-llama-cpp dispatches. */
async function makeContext(nSeq) {
  const batches = []; // per dispatched batch: {items: sequences in it, tokens}
  const decodes = []; // per llama_decode: tokens in the batch
  const nativeSeconds = []; // per llama_decode: seconds from the call to its completion
  const context = await model.createContext({
    sequences: nSeq,
    contextSize: args.promptLen + args.newTokens + 64, // per sequence
    batchSize: nSeq * args.promptLen,                  // a whole prefill fits in one llama_decode
    threads: { ideal: args.threads, min: args.threads },
    batching: {
      dispatchSchedule: "nextCycle",
      itemPrioritizationStrategy: ({ items, size }) => {
        const res = maximumParallelismStrategy({ items, size });
        batches.push({ items: res.length, tokens: res.reduce((s, r) => s + r.processAmount, 0) });
        return res;
      },
    },
  });
  // Count real llama_decode calls (node-llama-cpp internal: _ctx is the native AddonContext).
  const native = context._ctx;
  if (native != null && typeof native.initBatch === "function" && typeof native.decodeBatch === "function") {
    // The native object's methods are read-only: put a proxy in front of it instead.
    let pending = 0;
    context._ctx = new Proxy(native, {
      get(target, prop) {
        const v = Reflect.get(target, prop, target);
        if (prop === "initBatch") return (size) => { pending = size; return v.call(target, size); };
        if (prop === "decodeBatch") return () => {
          decodes.push(pending);
          const t = now();
          const r = v.call(target);
          const done = () => nativeSeconds.push(now() - t);
          if (r != null && typeof r.then === "function") return r.then((x) => { done(); return x; });
          done();
          return r;
        };
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
  }
  const sequences = Array.from({ length: nSeq }, () => context.getSequence());
  return { context, sequences, batches, decodes, nativeSeconds };
}

/** Prefill every sequence with its own prompt together, then decode newTokens steps together. */
async function run(ctx, prompts) {
  const { sequences, batches, decodes, nativeSeconds } = ctx;
  const sum = (a) => a.reduce((x, y) => x + y, 0);
  await Promise.all(sequences.map((s) => s.clearHistory()));
  batches.length = 0;
  decodes.length = 0;

  const probe = loadProbe();
  const t0 = now();
  await Promise.all(sequences.map((s, i) => s.evaluateWithoutGeneratingNewTokens(prompts[i])));
  const prefillSeconds = now() - t0;
  const prefillDecodes = decodes.splice(0);
  const prefillNative = sum(nativeSeconds.splice(0));
  batches.length = 0;

  // Decode: each sequence is fed one token (random; which one does not matter for speed) and then
  // generates greedily; every generated token costs one llama_decode step shared by all sequences.
  const firsts = prompts.map(() => 256 + Math.floor(random() * (nVocab - 256)));
  const t1 = now();
  // Lock-step: every step calls next() on all generators in the same tick, so all sequences queue
  // their token before node-llama-cpp dispatches the batch (with free-running loops, a sequence
  // whose sampling finished a little later missed the batch and was decoded alone).
  const gens = sequences.map((s, i) => s.evaluate([firsts[i]], { temperature: 0, yieldEogToken: true }));
  const outputs = sequences.map(() => []);
  for (let step = 0; step < args.newTokens; step++) {
    const results = await Promise.all(gens.map((g) => g.next()));
    results.forEach((r, i) => { if (!r.done) outputs[i].push(r.value); });
  }
  await Promise.all(gens.map((g) => g.return()));
  const decodeSeconds = now() - t1;
  const otherLoad = probe();
  const decodeDecodes = decodes.splice(0);
  const decodeNative = sum(nativeSeconds.splice(0));
  const decodeBatches = batches.splice(0);
  if (outputs.some((o) => o.length !== args.newTokens)) throw new Error("a sequence generated fewer tokens than asked");
  return { prefillSeconds, decodeSeconds, prefillNative, decodeNative, prefillDecodes, decodeDecodes, decodeBatches, otherLoad };
}

const rows = [];
for (const nSeq of [1, args.batch]) {
  const ctx = await makeContext(nSeq);
  const prompts = Array.from({ length: nSeq }, randomPrompt);
  await run(ctx, prompts); // warm-up (same shapes), untimed
  const r = await run(ctx, prompts);
  const threadsUsed = ctx.context.currentThreads;
  if (threadsUsed !== args.threads) throw new Error(`llama.cpp ran with ${threadsUsed} threads, wanted ${args.threads}`);

  // The batching checks: prefill in one llama_decode of nSeq*promptLen tokens, decode in exactly
  // newTokens llama_decode calls of nSeq tokens each (all sequences advanced together).
  if (r.prefillDecodes.length > 0 || r.decodeDecodes.length > 0) {
    const prefillOk = r.prefillDecodes.length === 1 && r.prefillDecodes[0] === nSeq * args.promptLen;
    const decodeOk = r.decodeDecodes.length === args.newTokens && r.decodeDecodes.every((n) => n === nSeq);
    log(`batch ${nSeq}: prefill llama_decode calls: ${JSON.stringify(r.prefillDecodes)}; ` +
      `decode llama_decode calls: ${r.decodeDecodes.length} with ${[...new Set(r.decodeDecodes)].join("/")} tokens each; ` +
      `sequences per dispatched batch: ${[...new Set(r.decodeBatches.map((b) => b.items))].join("/")}`);
    if (!prefillOk || !decodeOk)
      throw new Error(`batch ${nSeq}: llama_decode calls were not batched as expected ` +
        `(prefill ${JSON.stringify(r.prefillDecodes)}, decode ${JSON.stringify(r.decodeDecodes)})`);
  } else {
    log(`batch ${nSeq}: could not hook llama_decode (node-llama-cpp internals changed); batching strategy saw ` +
      `${[...new Set(r.decodeBatches.map((b) => b.items))].join("/")} sequences per decode batch`);
    if (r.decodeBatches.length !== args.newTokens || r.decodeBatches.some((b) => b.items !== nSeq))
      throw new Error(`batch ${nSeq}: decode steps were not batched across all sequences`);
  }

  const row = {
    engine: "llama.cpp",
    model: path.basename(args.model),
    batch_size: nSeq,
    prompt_len: args.promptLen,
    // The time inside llama_decode only (node-llama-cpp's JavaScript, sampling and scheduling
    // left out: the figure most favourable to llama.cpp), and the wall-clock time around it.
    prefill_tokens_per_s: Number(((nSeq * args.promptLen) / (r.prefillNative || r.prefillSeconds)).toFixed(2)),
    decode_tokens_per_s: Number(((nSeq * args.newTokens) / (r.decodeNative || r.decodeSeconds)).toFixed(2)),
    prefill_wall_tokens_per_s: Number(((nSeq * args.promptLen) / r.prefillSeconds).toFixed(2)),
    decode_wall_tokens_per_s: Number(((nSeq * args.newTokens) / r.decodeSeconds).toFixed(2)),
    threads: threadsUsed,
    new_tokens: args.newTokens,
    llama_decode_calls: { prefill: r.prefillDecodes.length, decode: r.decodeDecodes.length },
    other_cpu_load: Number(r.otherLoad.toFixed(3)),
  };
  if (r.otherLoad > 0.05)
    log(`WARNING: other processes used ${(100 * r.otherLoad).toFixed(0)}% of the CPUs during batch ${nSeq}: this number is not trustworthy`);
  rows.push(row);
  if (args.json) console.log(JSON.stringify(row));
  else console.log(`batch ${nSeq}: prefill ${row.prefill_tokens_per_s} tok/s, decode ${row.decode_tokens_per_s} tok/s`);
  await ctx.context.dispose();
}
log(`llama.cpp ${info.llama_cpp_release.release} (commit ${info.llama_cpp_build_info?.llama_commit ?? "?"}), ` +
  `node-llama-cpp ${info.node_llama_cpp_version}, ${info.binary}, ` +
  `${info.loaded_libraries.find((p) => /libggml-cpu-/.test(p)) ?? "?"}, threads ${args.threads}`);
await model.dispose();
await llama.dispose();
