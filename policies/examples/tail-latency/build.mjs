// Compile policy.js into a WebAssembly component with the ComponentizeJS API.
// Usage: node build.mjs <componentize-js module dir or entry> <wit dir> <source.js> <out.wasm>
// (build.sh computes the arguments; call that instead.)
//
// `jco componentize` is not used: its CLI mishandles --wit paths in the versions we tested, so we
// call the library directly. Every WASI feature ComponentizeJS can drop is disabled, which gives
// a "pure" component importing nothing at all: Math.random() becomes deterministic, Date.now()
// and timers are unusable, console.* output goes nowhere, and an uncaught exception traps (the
// host counts a fault) instead of printing. Thrown *strings* in `configure` are not affected:
// the bindings turn them into `err(string)`. To debug with console.log, build with
//   POLICY_JS_DISABLE=random,clocks,http,fetch-event ./build.sh
// (stdio then imports wasi:cli/wasi:io/wasi:filesystem, which the host accepts but leaves empty).
import { mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [entry, witPath, sourcePath, outPath] = process.argv.slice(2);
if (!outPath) {
  console.error('usage: node build.mjs <componentize-js entry> <wit dir> <source.js> <out.wasm>');
  process.exit(2);
}
const { componentize } = await import(pathToFileURL(resolve(entry)).href);
const { component } = await componentize({
  sourcePath: resolve(sourcePath),
  witPath: resolve(witPath),
  worldName: 'step-policy',
  disableFeatures: (process.env.POLICY_JS_DISABLE ?? 'stdio,random,clocks,http,fetch-event')
    .split(',').filter(Boolean),
  // Wizer (the pre-initializer) runs on wasmtime, whose compilation cache would otherwise land in
  // ~/.cache/wasmtime: build.sh keeps it in build/cache (it makes rebuilds ~2x faster).
  env: { XDG_CACHE_HOME: process.env.POLICY_BUILD_CACHE ?? join(tmpdir(), 'cache') },
});
await mkdir(dirname(resolve(outPath)), { recursive: true });
await writeFile(outPath, component);
console.error(`wrote ${outPath} (${component.length} bytes)`);
