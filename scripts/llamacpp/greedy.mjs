// Greedy generation with llama.cpp (prebuilt CPU binary from node-llama-cpp), from exact token ids.
//
//   node scripts/llamacpp/greedy.mjs MODEL.gguf CASES.json OUT.json [--threads 2] [--max-new 30]
//        [--kv-cache-type F16|F32] [--flash-attention auto|on|off]
//
// CASES.json has `cases: [{prompt_ids: [...]}, ...]` (e.g. tests/fixtures/smollm2_reference.json);
// its `eos_token_ids` (default [2]) stop generation. For each case the prompt ids are fed as they
// are (no tokenization, no BOS added) on a fresh sequence, then tokens are picked by argmax
// (node-llama-cpp's temperature 0 = llama.cpp's greedy sampler alone: no top-k/p, no repetition
// penalty, no token bias, no grammar) until an eos id (kept in the output) or --max-new tokens.
// OUT.json: {provenance: {...}, cases: [{prompt_ids, output_ids, output_text, stopped_at_eos,
// top_logprobs}]}, where top_logprobs[n] is llama.cpp's [id, log-probability] for its 8 most
// likely tokens at output position n (the first is the greedy token).
//
// Needs scripts/setup-llamacpp.sh to have run (node-llama-cpp@3.22.1 in .cache/llamacpp).
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { loadLlama } from "./lib.mjs";

function parseArgs(argv) {
  const positional = [];
  const opts = { threads: 2, maxNew: 30, kvCacheType: "F16", flashAttention: "auto" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--threads") opts.threads = Number(argv[++i]);
    else if (a === "--max-new") opts.maxNew = Number(argv[++i]);
    else if (a === "--kv-cache-type") opts.kvCacheType = argv[++i];
    else if (a === "--flash-attention") opts.flashAttention = argv[++i];
    else if (a === "-h" || a === "--help") {
      console.log("usage: node greedy.mjs MODEL.gguf CASES.json OUT.json [--threads N] [--max-new N] [--kv-cache-type F16|F32] [--flash-attention auto|on|off]");
      process.exit(0);
    } else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else positional.push(a);
  }
  if (positional.length !== 3) throw new Error("usage: node greedy.mjs MODEL.gguf CASES.json OUT.json [--threads N] [--max-new N] [--kv-cache-type F16|F32] [--flash-attention auto|on|off]");
  if (!(Number.isInteger(opts.threads) && opts.threads > 0)) throw new Error("--threads must be a positive integer");
  if (!(Number.isInteger(opts.maxNew) && opts.maxNew > 0)) throw new Error("--max-new must be a positive integer");
  if (!["F16", "F32"].includes(opts.kvCacheType)) throw new Error("--kv-cache-type must be F16 or F32");
  if (!["auto", "on", "off"].includes(opts.flashAttention)) throw new Error("--flash-attention must be auto, on or off");
  return { modelPath: positional[0], casesPath: positional[1], outPath: positional[2], ...opts };
}

function sha256File(file) {
  const h = crypto.createHash("sha256");
  const fd = fs.openSync(file, "r");
  const buf = Buffer.alloc(1 << 20);
  let n;
  while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
  fs.closeSync(fd);
  return h.digest("hex");
}

// How many of llama.cpp's most likely tokens each step's `top_logprobs` keeps.
const TOP_LOGPROBS = 8;

const args = parseArgs(process.argv.slice(2));
const input = JSON.parse(fs.readFileSync(args.casesPath, "utf8"));
const eosIds = new Set(input.eos_token_ids ?? [2]);

const { llama, info } = await loadLlama({ maxThreads: args.threads });
const model = await llama.loadModel({ modelPath: args.modelPath, gpuLayers: 0 });
const longest = Math.max(...input.cases.map((c) => c.prompt_ids.length));
const context = await model.createContext({
  sequences: 1,
  contextSize: Math.max(512, longest + args.maxNew + 16),
  batchSize: 512,
  threads: { ideal: args.threads, min: args.threads },
  // By default llama.cpp's defaults (flash attention "auto", an F16 K/V cache): what a user
  // comparing the two runs. The options pick other configurations of llama.cpp itself.
  flashAttention: { auto: "auto", on: true, off: false }[args.flashAttention],
  experimentalKvCacheKeyType: args.kvCacheType,
  experimentalKvCacheValueType: args.kvCacheType,
});
const sequence = context.getSequence();

const cases = [];
for (const c of input.cases) {
  await sequence.clearHistory();
  const promptIds = c.prompt_ids.map(Number);
  const outputIds = [];
  let stoppedAtEos = false;
  const topLogprobs = [];
  // temperature 0 selects llama.cpp's greedy (argmax) sampler; yieldEogToken lets us see and keep
  // the eos token instead of node-llama-cpp swallowing it. `probabilities` is llama.cpp's softmax
  // of its logits at each step (no sampler alters it at temperature 0): its log gives the logit
  // differences between tokens, kept for the TOP_LOGPROBS most likely ones.
  const gen = sequence.evaluateWithMetadata(
    promptIds,
    { probabilities: true },
    { temperature: 0, yieldEogToken: true },
  );
  for await (const { token, probabilities } of gen) {
    outputIds.push(token);
    // Most probable first; at an exact tie the greedy token first (it is llama.cpp's pick).
    const top = [...probabilities.entries()]
      .sort((a, b) => b[1] - a[1] || (b[0] === token) - (a[0] === token))
      .slice(0, TOP_LOGPROBS);
    if (top[0][0] !== token) throw new Error(`greedy token ${token} is not the most probable ${top[0][0]}`);
    topLogprobs.push(top.map(([id, p]) => [id, Number(Math.log(p).toFixed(5))]));
    if (eosIds.has(token)) { stoppedAtEos = true; break; }
    if (outputIds.length >= args.maxNew) break;
  }
  await gen.return?.();
  if (context.currentThreads !== args.threads)
    throw new Error(`context ran with ${context.currentThreads} threads, wanted ${args.threads}`);
  cases.push({
    prompt_ids: promptIds,
    output_ids: outputIds,
    output_text: model.detokenize(outputIds, true),
    stopped_at_eos: stoppedAtEos,
    top_logprobs: topLogprobs,
  });
  process.stderr.write(`[greedy] case ${cases.length}/${input.cases.length}: ${outputIds.length} tokens\n`);
}

const out = {
  provenance: {
    engine: "llama.cpp",
    node_llama_cpp_version: info.node_llama_cpp_version,
    prebuilt_package: `@node-llama-cpp/linux-x64@${info.prebuilt_package_version}`,
    llama_cpp_release: info.llama_cpp_release,
    llama_cpp_build_info: info.llama_cpp_build_info,
    binary: info.binary,
    build_type: info.buildType,
    gpu: info.gpu,
    cpu_backend_library: info.loaded_libraries.find((p) => /libggml-cpu-/.test(p)) ?? null,
    threads: args.threads,
    context: { size: context.contextSize, batch_size: context.batchSize, flash_attention: context.flashAttention, kv_cache_type: args.kvCacheType === "F16" ? "F16 (default)" : args.kvCacheType },
    sampler: "greedy (temperature 0, no other samplers)",
    model_file: path.basename(args.modelPath),
    model_sha256: sha256File(args.modelPath),
    cases_file: path.basename(args.casesPath),
    max_new_tokens: args.maxNew,
    eos_token_ids: [...eosIds],
    date: new Date().toISOString(),
    command: `node scripts/llamacpp/greedy.mjs ${path.basename(args.modelPath)} ${path.basename(args.casesPath)} ${path.basename(args.outPath)} --threads ${args.threads} --max-new ${args.maxNew}` +
      (args.kvCacheType !== "F16" ? ` --kv-cache-type ${args.kvCacheType}` : "") +
      (args.flashAttention !== "auto" ? ` --flash-attention ${args.flashAttention}` : ""),
  },
  cases,
};
// Indented JSON, but each array of numbers (token ids, [id, logprob] pairs) on one line, and
// each step's list of pairs too.
const number = String.raw`-?\d+(?:\.\d+)?(?:e-?\d+)?`;
const text = JSON.stringify(out, null, 2)
  .replace(new RegExp(String.raw`\[\s*(${number}(?:\s*,\s*${number})*)\s*\]`, "g"), (_, body) => `[${body.split(/\s*,\s*/).join(", ")}]`)
  .replace(/\[\s*(\[[^\[\]]*\](?:\s*,\s*\[[^\[\]]*\])*)\s*\]/g, (_, body) => `[${body.split(/\]\s*,\s*\[/).join("], [")}]`);
fs.writeFileSync(args.outPath, text + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
console.log(`wrote ${args.outPath} (${cases.length} cases)`);
