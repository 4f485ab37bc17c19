//! Builds the policy components the host embeds (and the test-only ones its tests load).
//!
//! The guests live in their own workspace, `policies/`. This script runs the same `cargo`
//! that builds the host, for `wasm32-unknown-unknown`, into a target directory under
//! `OUT_DIR`, then wraps each core module into a component with `wit-component`. So a clean
//! checkout needs no manual step: `cargo build` produces the embedded default policy. The
//! results are `$OUT_DIR/components/<name>.wasm`, and the directory is exported to the crate
//! as `STEPSCOPE_GUEST_DIR`. Guests that need WASI through Rust's std (the test-only
//! `wasi-probe`) are built for `wasm32-wasip2`, whose output is already a component.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest crates (package name, component file name).
const GUESTS: &[(&str, &str)] = &[
    ("stepscope-policy-default", "default"),
    ("stepscope-policy-pressure", "pressure"),
    ("stepscope-policy-hostile", "hostile"),
    ("stepscope-policy-wrong-world", "wrong-world"),
    ("stepscope-policy-host-import", "host-import"),
    ("stepscope-policy-stall", "stall"),
    ("stepscope-policy-default-v01", "default-v01"),
];

/// Guest crates built for `wasm32-wasip2` (package name, component file name).
const WASIP2_GUESTS: &[(&str, &str)] = &[("stepscope-policy-wasi-probe", "wasi-probe")];

fn main() {
    if let Err(message) = run() {
        eprintln!("error building the policy components: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let policies = manifest_dir.join("../policies");
    let wit = manifest_dir.join("../wit");
    for path in [
        &wit,
        &policies.join("Cargo.toml"),
        &policies.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Only the Rust guests built here: the templates and the non-Rust examples (whose build
    // directories change whenever their tests build them) must not re-run this script.
    for dir in ["default", "examples/pressure", "testing"] {
        println!("cargo:rerun-if-changed={}", policies.join(dir).display());
    }

    let target_dir = out_dir.join("guest-target");
    build_guests(&policies, &target_dir, "wasm32-unknown-unknown", GUESTS)?;
    build_guests(&policies, &target_dir, "wasm32-wasip2", WASIP2_GUESTS)?;

    let components = out_dir.join("components");
    std::fs::create_dir_all(&components).map_err(|e| format!("{}: {e}", components.display()))?;
    for (package, name) in GUESTS {
        let module_path = target_dir
            .join("wasm32-unknown-unknown/release")
            .join(format!("{}.wasm", package.replace('-', "_")));
        let component = componentize(&module_path)?;
        let dest = components.join(format!("{name}.wasm"));
        std::fs::write(&dest, component).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    for (package, name) in WASIP2_GUESTS {
        let source = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", package.replace('-', "_")));
        let dest = components.join(format!("{name}.wasm"));
        std::fs::copy(&source, &dest).map_err(|e| format!("{}: {e}", source.display()))?;
    }
    println!(
        "cargo:rustc-env=STEPSCOPE_GUEST_DIR={}",
        components.display()
    );
    Ok(())
}

/// Runs the host build's own `cargo` on the guest workspace for `target`.
fn build_guests(
    policies: &Path,
    target_dir: &Path,
    target: &str,
    guests: &[(&str, &str)],
) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .current_dir(policies)
        .args(["build", "--release", "--locked", "--target", target])
        .arg("--target-dir")
        .arg(target_dir);
    for (package, _) in guests {
        command.args(["-p", package]);
    }
    // The outer build's settings are for the host target; don't leak them into the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo for the guests: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build --target {target}` in {} failed ({status}); \
             is the target installed? (`rustup target add {target}`)",
            policies.display()
        ));
    }
    Ok(())
}

/// Wraps a core module carrying wit-bindgen's component-type section into a component.
fn componentize(module_path: &Path) -> Result<Vec<u8>, String> {
    let module =
        std::fs::read(module_path).map_err(|e| format!("{}: {e}", module_path.display()))?;
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("componentizing {}: {e:#}", module_path.display()))
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}
