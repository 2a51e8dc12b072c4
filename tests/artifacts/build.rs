//! Builds every example and fixture component for `wasm32-wasip2` with one nested cargo
//! invocation (in its own target dir, so it never waits on the outer build's lock) and hands
//! their paths to the library as `TENSORLET_COMPONENT_<NAME>` constants.

use std::path::PathBuf;
use std::process::Command;

/// (package, artifact file, constant suffix)
const COMPONENTS: &[(&str, &str, &str)] = &[
    ("hello", "hello.wasm", "HELLO"),
    ("classify", "classify.wasm", "CLASSIFY"),
    ("kv-counter", "kv_counter.wasm", "KV_COUNTER"),
    ("misbehave", "misbehave.wasm", "MISBEHAVE"),
    ("not-http", "not-http.wasm", "NOT_HTTP"),
    ("openai", "openai.wasm", "OPENAI"),
    ("pipeline", "pipeline.wasm", "PIPELINE"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root");
    for watched in [
        "guest-sdk",
        "wit",
        "components",
        "tests/components",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = root.join("target").join("wasm-components");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for (package, _, _) in COMPONENTS {
        command.args(["--package", package]);
    }
    // Flags meant for the outer build (clippy's wrapper, host rustflags) must not leak in.
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(variable);
    }
    let status = command
        .status()
        .expect("running cargo to build the components");
    assert!(
        status.success(),
        "building the components failed; is the target installed? (`rustup target add wasm32-wasip2`)"
    );
    for (_, file, constant) in COMPONENTS {
        let path = target_dir.join("wasm32-wasip2").join("release").join(file);
        assert!(path.exists(), "{} was not built", path.display());
        println!(
            "cargo:rustc-env=TENSORLET_COMPONENT_{constant}={}",
            path.display()
        );
    }
}
