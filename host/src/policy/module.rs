//! Loading a policy: compile the component once, check it against the contract, and keep a
//! pre-linked instance template (`InstancePre`) so re-instantiation after a fault is cheap.

use super::bindings::{v01, v02};
use super::cache;
use super::limits::PolicyLimits;
use super::wasi::{self, ImportPlan};
use super::{DEFAULT_POLICY_WASM, POLICY_INTERFACE, POLICY_INTERFACE_V01};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use wasmtime::Engine;
use wasmtime::component::Linker;

/// Why a policy was refused at load time. Each message fits on one line and names the problem.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{name}: not a WebAssembly file (no `\\0asm` header)")]
    NotWasm { name: String },
    #[error(
        "{name}: a core WebAssembly module, not a component; wrap it with `wasm-tools component new`"
    )]
    CoreModule { name: String },
    #[error("{name}: invalid WebAssembly component: {reason}")]
    Invalid { name: String, reason: String },
    #[error(
        "{name}: does not export `{POLICY_INTERFACE}` or `{POLICY_INTERFACE_V01}` (it exports: {exports}); build it against wit/policy.wit"
    )]
    WrongWorld { name: String, exports: String },
    #[error(
        "{name}: imports {imports}, which a policy may not use (only WASI 0.2 interfaces are linked, to an empty sandbox; no host functions are granted)"
    )]
    ForbiddenImports { name: String, imports: String },
    #[error("{name}: does not match the policy contract: {reason}")]
    Mismatch { name: String, reason: String },
    #[error("{name}: instantiation failed: {reason}")]
    Instantiate { name: String, reason: String },
    #[error("{name}: configure refused the parameters: {reason}")]
    Configure { name: String, reason: String },
    #[error("wasm engine setup failed: {0}")]
    Engine(String),
}

/// Where a policy comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PolicySource {
    /// The default policy embedded in the binary.
    #[default]
    BuiltinDefault,
    /// A component file.
    File(PathBuf),
}

impl PolicySource {
    /// `None` means the built-in default.
    pub fn from_option(path: Option<&Path>) -> Self {
        match path {
            Some(path) => PolicySource::File(path.to_path_buf()),
            None => PolicySource::BuiltinDefault,
        }
    }
}

/// A compiled, validated policy component, ready to instantiate any number of times.
#[derive(Clone)]
pub struct PolicyModule {
    inner: Arc<ModuleInner>,
}

/// Which version of the contract a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContractVersion {
    /// `stepscope:policy@0.1.0`: no `decide-request`; the host decides journeys by rate.
    V01,
    /// `stepscope:policy@0.2.0`.
    V02,
}

impl ContractVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V01 => "0.1.0",
            Self::V02 => "0.2.0",
        }
    }
}

/// The pre-linked instance template, per contract version.
pub(crate) enum PolicyPre {
    V01(v01::StepPolicyPre<super::runtime::StoreState>),
    V02(v02::StepPolicyPre<super::runtime::StoreState>),
}

struct ModuleInner {
    engine: Engine,
    pre: PolicyPre,
    name: String,
    digest: String,
    size_bytes: usize,
    limits: PolicyLimits,
    wasi_imports: Vec<String>,
}

impl std::fmt::Debug for PolicyModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyModule")
            .field("name", &self.inner.name)
            .field("digest", &self.inner.digest)
            .finish()
    }
}

impl PolicyModule {
    /// Loads the built-in default or a file.
    pub fn load(source: &PolicySource, limits: PolicyLimits) -> Result<Self, PolicyError> {
        match source {
            PolicySource::BuiltinDefault => {
                Self::from_bytes("builtin:default", DEFAULT_POLICY_WASM, limits)
            }
            PolicySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_bytes(&path.display().to_string(), &bytes, limits)
            }
        }
    }

    /// Compiles and validates component bytes; `name` appears in errors and traces.
    pub fn from_bytes(name: &str, bytes: &[u8], limits: PolicyLimits) -> Result<Self, PolicyError> {
        let name = name.to_string();
        check_header(&name, bytes)?;
        let engine = super::epoch::shared_engine(limits.fuel_per_call > 0)
            .map_err(|e| PolicyError::Engine(one_line(&e)))?;
        let digest = sha256_hex(bytes);
        let digest_hex = digest.trim_start_matches("sha256:");
        let (component, compile_source) =
            cache::compile(&engine, bytes, digest_hex).map_err(|e| PolicyError::Invalid {
                name: name.clone(),
                reason: one_line(&e),
            })?;
        tracing::debug!(policy = %name, %digest, source = ?compile_source, "policy component ready");
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&engine).map(|(n, _)| n.to_string()).collect();
        let import_plan = ImportPlan::classify(imports.iter().map(String::as_str));
        if !import_plan.refused.is_empty() {
            return Err(PolicyError::ForbiddenImports {
                name,
                imports: import_plan.refused.join(", "),
            });
        }
        let exports: Vec<String> = ty.exports(&engine).map(|(n, _)| n.to_string()).collect();
        let version = if exports.iter().any(|e| e == POLICY_INTERFACE) {
            ContractVersion::V02
        } else if exports.iter().any(|e| e == POLICY_INTERFACE_V01) {
            ContractVersion::V01
        } else {
            let exports = if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            };
            return Err(PolicyError::WrongWorld { name, exports });
        };
        let mut linker = Linker::new(&engine);
        if import_plan.needs_wasi() {
            wasi::add_to_linker(&mut linker).map_err(|e| PolicyError::Engine(one_line(&e)))?;
        }
        let instance_pre =
            linker
                .instantiate_pre(&component)
                .map_err(|e| PolicyError::Mismatch {
                    name: name.clone(),
                    reason: one_line(&e),
                })?;
        let mismatch = |e: wasmtime::Error| PolicyError::Mismatch {
            name: name.clone(),
            reason: one_line(&e),
        };
        let pre = match version {
            ContractVersion::V02 => {
                PolicyPre::V02(v02::StepPolicyPre::new(instance_pre).map_err(mismatch)?)
            }
            ContractVersion::V01 => {
                PolicyPre::V01(v01::StepPolicyPre::new(instance_pre).map_err(mismatch)?)
            }
        };
        Ok(Self {
            inner: Arc::new(ModuleInner {
                engine,
                pre,
                name,
                digest,
                size_bytes: bytes.len(),
                limits,
                wasi_imports: import_plan.wasi,
            }),
        })
    }

    /// Display name: `builtin:default` or the file path.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn size_bytes(&self) -> usize {
        self.inner.size_bytes
    }

    pub fn limits(&self) -> PolicyLimits {
        self.inner.limits
    }

    /// The WASI interfaces the component imports (served by the empty sandbox context).
    pub fn wasi_imports(&self) -> &[String] {
        &self.inner.wasi_imports
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn pre(&self) -> &PolicyPre {
        &self.inner.pre
    }

    /// The contract version the component was built against.
    pub fn contract_version(&self) -> ContractVersion {
        match self.inner.pre {
            PolicyPre::V01(_) => ContractVersion::V01,
            PolicyPre::V02(_) => ContractVersion::V02,
        }
    }
}

fn check_header(name: &str, bytes: &[u8]) -> Result<(), PolicyError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(PolicyError::NotWasm {
            name: name.to_string(),
        });
    }
    // Core modules have version 1 and layer 0; components have layer 1.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(PolicyError::CoreModule {
            name: name.to_string(),
        });
    }
    Ok(())
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Flattens an error chain into one line, escaped and bounded: a guest chooses part of it
/// (function names in backtraces, exit codes), so it goes through
/// [`super::guest_text::sanitize`].
pub(crate) fn one_line(error: &wasmtime::Error) -> String {
    super::guest_text::sanitize(&format!("{error:#}").replace('\n', " "))
}
