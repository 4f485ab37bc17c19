//! An on-disk cache of compiled policy components.
//!
//! Cranelift compiles a Rust policy (tens of KB) in tens of milliseconds, but a Python or
//! JavaScript one (12–18 MB, a whole interpreter) takes about ten seconds on a small machine.
//! Components of at least [`CACHE_MIN_BYTES`] are therefore compiled once with
//! `Engine::precompile_component` and stored as `<sha256 of the component>-<engine hash>.cwasm`,
//! where the engine hash covers wasmtime's version and every compilation setting that makes an
//! artifact incompatible (`Engine::precompile_compatibility_hash`): a different stepscope build
//! or fuel setting simply misses. Later loads deserialize the artifact in milliseconds.
//!
//! Location: `STEPSCOPE_POLICY_CACHE` (a directory, or `off`), else
//! `$XDG_CACHE_HOME/stepscope/policies`, else `$HOME/.cache/stepscope/policies`. Writes go to a
//! temporary file renamed into place, so concurrent processes never see half an artifact; only
//! the [`CACHE_MAX_ARTIFACTS`] newest artifacts are kept. Any
//! cache failure (unreadable directory, corrupt or stale file) falls back to compiling: the cache
//! can make loading faster, never make it fail.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Components smaller than this compile quickly enough not to be cached.
pub const CACHE_MIN_BYTES: usize = 1 << 20;

/// Artifacts kept in the cache directory; older ones are deleted when a new one is written.
pub const CACHE_MAX_ARTIFACTS: usize = 16;

/// Environment variable naming the cache directory (`off` disables the cache).
pub const CACHE_ENV: &str = "STEPSCOPE_POLICY_CACHE";

/// How a component was obtained, for logs and `policy check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled now, not cached (small component, or cache off).
    Compiled,
    /// Compiled now and written to the cache.
    CompiledAndCached,
    /// Loaded from a cached artifact.
    Cached,
}

/// The cache directory from the environment, or `None` when disabled or undeterminable.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_ENV) {
        Some(value) if value == "off" || value.is_empty() => None,
        Some(value) => Some(PathBuf::from(value)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .map(|base| base.join("stepscope").join("policies")),
    }
}

/// Compiles `bytes`, through the cache when the component is large enough.
pub fn compile(
    engine: &Engine,
    bytes: &[u8],
    digest_hex: &str,
) -> wasmtime::Result<(Component, CompileSource)> {
    let dir = if bytes.len() >= CACHE_MIN_BYTES {
        cache_dir()
    } else {
        None
    };
    compile_in(engine, bytes, digest_hex, dir.as_deref())
}

/// Compiles `bytes` through the cache in `dir` (none: no cache), whatever their size.
pub(crate) fn compile_in(
    engine: &Engine,
    bytes: &[u8],
    digest_hex: &str,
    dir: Option<&Path>,
) -> wasmtime::Result<(Component, CompileSource)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, bytes)?, CompileSource::Compiled));
    };
    let path = dir.join(format!("{digest_hex}-{:016x}.cwasm", engine_hash(engine)));
    if let Ok(artifact) = std::fs::read(&path) {
        // Read into memory rather than mapped (`deserialize_file`): a mapping would turn a file
        // truncated under a running server into a SIGBUS.
        // SAFETY: `deserialize` trusts that the bytes are an artifact produced by
        // `precompile_component` of a compatible engine. The name encodes the component digest
        // and the engine's compatibility hash, the file is only ever written by `store` below
        // (atomically, by rename), and wasmtime itself checks the artifact's header, version
        // and settings before use. The cache directory must be as trusted as the binary.
        match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => return Ok((component, CompileSource::Cached)),
            Err(error) => tracing::warn!(
                path = %path.display(),
                error = %format!("{error:#}"),
                "ignoring an unusable cached policy artifact"
            ),
        }
    }
    let artifact = engine.precompile_component(bytes)?;
    // SAFETY: the bytes were produced just now by `precompile_component` of this engine.
    let component = unsafe { Component::deserialize(engine, &artifact)? };
    match store(dir, &path, &artifact) {
        Ok(()) => Ok((component, CompileSource::CompiledAndCached)),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot write the policy compile cache");
            Ok((component, CompileSource::Compiled))
        }
    }
}

fn engine_hash(engine: &Engine) -> u64 {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

fn store(dir: &Path, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact"),
        std::process::id()
    ));
    std::fs::write(&temp, artifact)?;
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })?;
    prune(dir, path);
    Ok(())
}

/// Keeps the [`CACHE_MAX_ARTIFACTS`] most recently written artifacts (an interpreter-based
/// artifact is ~40 MB, and each rebuild of such a policy has a new digest).
fn prune(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut artifacts: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm") && p != keep)
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    artifacts.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, old) in artifacts.into_iter().skip(CACHE_MAX_ARTIFACTS - 1) {
        let _ = std::fs::remove_file(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiled_component_is_cached_reused_and_recompiled_when_corrupt() {
        let dir = std::env::temp_dir().join(format!("stepscope-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).unwrap();
        let bytes = crate::policy::DEFAULT_POLICY_WASM;
        let digest = crate::policy::digest_of(bytes);
        let hex = digest.trim_start_matches("sha256:");

        let (_, first) = compile_in(&engine, bytes, hex, Some(&dir)).unwrap();
        assert_eq!(first, CompileSource::CompiledAndCached);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "one artifact, no temporary file left");
        let artifact = files[0].path();
        assert!(
            artifact
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(hex)
        );

        let (component, second) = compile_in(&engine, bytes, hex, Some(&dir)).unwrap();
        assert_eq!(second, CompileSource::Cached);
        assert!(
            component
                .component_type()
                .exports(&engine)
                .any(|(name, _)| name == crate::policy::POLICY_INTERFACE
                    || name == crate::policy::POLICY_INTERFACE_V01)
        );

        // A corrupt artifact is ignored, recompiled and replaced.
        std::fs::write(&artifact, b"not an artifact").unwrap();
        let (_, third) = compile_in(&engine, bytes, hex, Some(&dir)).unwrap();
        assert_eq!(third, CompileSource::CompiledAndCached);
        let (_, fourth) = compile_in(&engine, bytes, hex, Some(&dir)).unwrap();
        assert_eq!(fourth, CompileSource::Cached);

        // Another engine configuration misses instead of loading an incompatible artifact.
        let mut fuel = wasmtime::Config::new();
        fuel.wasm_component_model(true).consume_fuel(true);
        let fuel_engine = Engine::new(&fuel).unwrap();
        let (_, other) = compile_in(&fuel_engine, bytes, hex, Some(&dir)).unwrap();
        assert_eq!(other, CompileSource::CompiledAndCached);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
