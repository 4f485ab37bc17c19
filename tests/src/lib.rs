//! Helpers for the end-to-end tests in `tests/tests/`: locating the built `stepscope` binary
//! and running it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `stepscope` binary of the same build profile as the running test.
///
/// Test executables live in `target/<profile>/deps/`; the binary is `target/<profile>/stepscope`.
/// `cargo test --workspace` builds it, because the `stepscope` package has integration tests.
pub fn stepscope_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable is in target/<profile>/deps");
    let bin = profile_dir.join(format!("stepscope{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests through `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Runs `stepscope ARGS…` to completion.
pub fn stepscope(args: &[&str]) -> Output {
    Command::new(stepscope_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn stepscope")
}

/// A fresh empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("stepscope-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
