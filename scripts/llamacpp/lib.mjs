// Shared helpers for scripts/llamacpp/*.mjs: load node-llama-cpp from <repo>/.cache/llamacpp
// (installed by scripts/setup-llamacpp.sh) and get llama.cpp's PREBUILT CPU binary only:
// gpu off, build "never", no download. Also reports which binary was really loaded (from
// /proc/self/maps) and which llama.cpp release the package says it ships.
//
// `node scripts/llamacpp/lib.mjs --check` loads the binary and prints one JSON line with what was
// loaded (used by setup-llamacpp.sh's verification).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const LLAMACPP_DIR = process.env.STEPSCOPE_LLAMACPP_DIR ?? path.join(REPO_ROOT, ".cache", "llamacpp");
export const NLC_DIR = path.join(LLAMACPP_DIR, "node_modules", "node-llama-cpp");
export const PREBUILT_DIR = path.join(LLAMACPP_DIR, "node_modules", "@node-llama-cpp", "linux-x64");

// The package's own switches (read when its config module is first imported): never download
// llama.cpp's source and never run a build.
process.env.NODE_LLAMA_CPP_SKIP_DOWNLOAD = "true";
process.env.NODE_LLAMA_CPP_GPU = "false";

let nlcModule = null;

/** The node-llama-cpp module (dist/index.js) from .cache/llamacpp. */
export async function nodeLlamaCpp() {
  if (nlcModule == null) {
    const entry = path.join(NLC_DIR, "dist", "index.js");
    if (!fs.existsSync(entry))
      throw new Error(`node-llama-cpp is not installed in ${LLAMACPP_DIR}: run scripts/setup-llamacpp.sh`);
    nlcModule = await import(pathToFileURL(entry).href);
  }
  return nlcModule;
}

/** getLlama() for the prebuilt CPU binary only; throws when that is not what got loaded. */
export async function loadLlama({ maxThreads } = {}) {
  const { getLlama, LlamaLogLevel } = await nodeLlamaCpp();
  const llama = await getLlama({
    gpu: false,
    build: "never",
    skipDownload: true,
    usePrebuiltBinaries: true,
    progressLogs: false,
    logLevel: LlamaLogLevel.error,
    ...(maxThreads != null ? { maxThreads } : {}),
  });
  const info = binaryInfo(llama);
  if (info.buildType !== "prebuilt") throw new Error(`loaded a ${info.buildType} llama.cpp binary, not the prebuilt one`);
  if (info.gpu !== false) throw new Error(`llama.cpp gpu is ${info.gpu}, expected false`);
  if (info.addon == null || !info.addon.startsWith(PREBUILT_DIR + path.sep))
    throw new Error(`the loaded addon is not from ${PREBUILT_DIR}: ${info.addon}`);
  return { llama, info };
}

/** What was loaded: paths relative to .cache/llamacpp/node_modules, read from /proc/self/maps. */
export function binaryInfo(llama) {
  const mapped = new Set(
    fs.readFileSync("/proc/self/maps", "utf8").split("\n")
      .map((line) => line.trim().split(/\s+/).slice(5).join(" "))
      .filter((p) => p.startsWith("/") && /\.(node|so)(\.|$)/.test(p))
  );
  const nm = path.join(LLAMACPP_DIR, "node_modules") + path.sep;
  const ours = [...mapped].filter((p) => p.startsWith(nm)).sort();
  const addon = ours.find((p) => p.endsWith("llama-addon.node")) ?? null;
  const rel = (p) => path.relative(path.join(LLAMACPP_DIR, "node_modules"), p);
  let buildMetadata = null;
  if (addon != null) {
    const meta = path.join(path.dirname(addon), "_nlcBuildMetadata.json");
    if (fs.existsSync(meta)) buildMetadata = JSON.parse(fs.readFileSync(meta, "utf8"));
  }
  // LLAMA_COMMIT etc. read out of libllama-common.so by setup-llamacpp.sh (optional).
  let buildInfo = null;
  try {
    buildInfo = JSON.parse(fs.readFileSync(path.join(LLAMACPP_DIR, "llama-cpp-build-info.json"), "utf8"));
  } catch { /* not written */ }
  return {
    node_llama_cpp_version: JSON.parse(fs.readFileSync(path.join(NLC_DIR, "package.json"), "utf8")).version,
    prebuilt_package_version: JSON.parse(fs.readFileSync(path.join(PREBUILT_DIR, "package.json"), "utf8")).version,
    llama_cpp_release: { ...llama.llamaCppRelease },
    llama_cpp_build_info: buildInfo,
    build_metadata: buildMetadata,
    buildType: llama.buildType,
    gpu: llama.gpu,
    addon,
    binary: addon == null ? null : rel(addon),
    loaded_libraries: ours.map(rel),
  };
}

if (process.argv[1] != null && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url) && process.argv[2] === "--check") {
  const { llama, info } = await loadLlama();
  console.log(JSON.stringify({
    buildType: info.buildType, gpu: info.gpu, binary: info.binary,
    llama_cpp_release: info.llama_cpp_release, cpuMathCores: llama.cpuMathCores,
    build_metadata: info.build_metadata,
  }));
  await llama.dispose();
}
