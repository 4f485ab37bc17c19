//! Finding the CUDA libraries at run time.
//!
//! cudarc (feature `dynamic-loading`, `cuda-13000`) opens each library by bare soname on first
//! use — `libcuda.so.1`; `libnvrtc.so`, `libnvrtc.so.13`, `libnvrtc.so.12`, ...; `libcublas.so`,
//! `libcublas.so.13`, `libcublas.so.12`, ... — so the dynamic linker's default search applies
//! (`LD_LIBRARY_PATH`, the ld cache), and it panics if none loads. Before cudarc touches a
//! library we check that it loads ([`ensure_nvrtc`] and friends); if it does not, we look in
//! the usual install locations and open the library there by absolute path. glibc then answers
//! cudarc's later `dlopen("libnvrtc.so.12")` with the already loaded object, because its soname
//! matches. The libraries opened this way stay loaded for the life of the process.
//!
//! Searched, in order: `$STEPSCOPE_CUDA_LIB_DIRS` (colon-separated), the test install
//! `<repo>/.cache/nvrtc/nvidia/cuda_nvrtc/lib` (see `scripts/install-nvrtc.sh`), `$CUDA_HOME`,
//! `$CUDA_PATH`, `$CUDA_ROOT` (`lib64`, `lib`), `/usr/local/cuda/lib64`,
//! `/usr/local/cuda/targets/x86_64-linux/lib`, `/usr/local/nvidia/lib64`, and the `nvidia/*/lib`
//! folders of pip's CUDA wheels under `/usr/local/lib/python3*/dist-packages` and
//! `site-packages`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::CudaError;

/// Colon-separated extra directories searched for the CUDA libraries.
pub const LIB_DIRS_ENV: &str = "STEPSCOPE_CUDA_LIB_DIRS";

/// Where `scripts/install-nvrtc.sh` puts NVRTC (relative to the repository root).
pub const TEST_NVRTC_LIB_DIR: &str = ".cache/nvrtc/nvidia/cuda_nvrtc/lib";

/// Libraries opened by absolute path, kept loaded for the life of the process.
static PRELOADED: Mutex<Vec<(PathBuf, libloading::Library)>> = Mutex::new(Vec::new());

/// The repository root: `$STEPSCOPE_REPO_ROOT` (set by `scripts/gpu-check.sh`, whose binaries
/// run in a copy of the tree somewhere else), else the checkout this binary was built from.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("STEPSCOPE_REPO_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Every directory searched for CUDA libraries, existing ones only, without duplicates.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var(LIB_DIRS_ENV) {
        dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    if let Ok(root) = std::env::var("STEPSCOPE_NVRTC_ROOT") {
        dirs.push(Path::new(&root).join("nvidia/cuda_nvrtc/lib"));
    }
    dirs.push(repo_root().join(TEST_NVRTC_LIB_DIR));
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Ok(v) = std::env::var(var) {
            dirs.push(Path::new(&v).join("lib64"));
            dirs.push(Path::new(&v).join("lib"));
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    // pip wheels: nvidia/<component>/lib (CUDA 12) and nvidia/cu13/lib (CUDA 13).
    for base in ["/usr/local/lib", "/usr/lib", "/opt"] {
        for pattern_dir in python_site_dirs(Path::new(base)) {
            let nv = pattern_dir.join("nvidia");
            if let Ok(entries) = std::fs::read_dir(&nv) {
                let mut libs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path().join("lib")))
                    .collect();
                libs.sort();
                dirs.extend(libs);
            }
        }
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let keep = d.is_dir() && !seen.contains(d);
        if keep {
            seen.push(d.clone());
        }
        keep
    });
    dirs
}

/// `site-packages` / `dist-packages` folders of the Python installs under `base` (one level of
/// `python3*` and one of virtual environments such as `/opt/*/.venv/lib/python3*`).
fn python_site_dirs(base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut lib_dirs = vec![base.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            lib_dirs.push(e.path().join(".venv/lib"));
            lib_dirs.push(e.path().join("lib"));
        }
    }
    for lib in lib_dirs {
        if let Ok(entries) = std::fs::read_dir(&lib) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with("python3") {
                    out.push(e.path().join("site-packages"));
                    out.push(e.path().join("dist-packages"));
                }
            }
        }
    }
    out
}

/// A library cudarc loads, the file names we accept for it (their sonames must be among
/// cudarc's candidates) and libraries to open first from the same folder.
struct LibSpec {
    what: &'static str,
    files: &'static [&'static str],
    deps: &'static [&'static str],
    hint: &'static str,
}

const DRIVER: LibSpec = LibSpec {
    what: "the CUDA driver library libcuda.so.1",
    files: &["libcuda.so.1"],
    deps: &[],
    hint: "install the NVIDIA driver, or use --device cpu",
};

const NVRTC: LibSpec = LibSpec {
    what: "NVRTC (libnvrtc.so.13 or libnvrtc.so.12)",
    files: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
    deps: &["libnvrtc-builtins.so.13.*", "libnvrtc-builtins.so.12.*"],
    hint: "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12` (scripts/install-nvrtc.sh installs it into .cache/nvrtc), or point STEPSCOPE_CUDA_LIB_DIRS at the folder holding libnvrtc",
};

const CUBLAS: LibSpec = LibSpec {
    what: "cuBLAS (libcublas.so.13 or libcublas.so.12)",
    files: &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
    deps: &["libcublasLt.so.13", "libcublasLt.so.12"],
    hint: "install the CUDA toolkit or `pip install nvidia-cublas-cu12`, or point STEPSCOPE_CUDA_LIB_DIRS at the folder holding libcublas",
};

/// Makes sure cudarc can load the CUDA driver library.
pub fn ensure_driver() -> Result<(), CudaError> {
    ensure(&DRIVER, || unsafe {
        cudarc::driver::sys::is_culib_present()
    })
}

/// Makes sure cudarc can load NVRTC.
pub fn ensure_nvrtc() -> Result<(), CudaError> {
    ensure(&NVRTC, || unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

/// Makes sure cudarc can load cuBLAS.
pub fn ensure_cublas() -> Result<(), CudaError> {
    ensure(&CUBLAS, || unsafe {
        cudarc::cublas::sys::is_culib_present()
    })
}

fn ensure(spec: &LibSpec, present: impl Fn() -> bool) -> Result<(), CudaError> {
    if present() {
        return Ok(());
    }
    let dirs = search_dirs();
    for dir in &dirs {
        for file in spec.files {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            for dep in spec.deps {
                for dep_path in glob_in(dir, dep) {
                    let _ = preload(&dep_path);
                }
            }
            if preload(&path).is_ok() && present() {
                return Ok(());
            }
        }
    }
    let searched = if dirs.is_empty() {
        "default library path".to_owned()
    } else {
        format!(
            "default library path, {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(CudaError::LibraryMissing {
        library: spec.what,
        searched,
        hint: spec.hint,
    })
}

/// Files in `dir` matching `pattern` (a literal name, or a prefix followed by `*`).
fn glob_in(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    match pattern.strip_suffix('*') {
        None => {
            let p = dir.join(pattern);
            if p.is_file() { vec![p] } else { Vec::new() }
        }
        Some(prefix) => {
            let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect();
            out.sort();
            out
        }
    }
}

fn preload(path: &Path) -> Result<(), libloading::Error> {
    let mut held = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(p, _)| p == path) {
        return Ok(());
    }
    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(path) }?;
    held.push((path.to_path_buf(), lib));
    Ok(())
}
