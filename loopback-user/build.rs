//! Builds the eBPF object (`loopback-ebpf`) for bpfel-unknown-none and puts it in OUT_DIR, where
//! `src/bpf/object.rs` embeds it.
//!
//! We do not use aya-build here: it requires the eBPF crate to be a member of this workspace and
//! runs `rustup run <toolchain>`, while we keep the eBPF crate in its own workspace (its own
//! release profile, panic=abort) and build it with the *current* stable toolchain plus
//! RUSTC_BOOTSTRAP=1 for `-Z build-std=core`, which is what this machine supports.
//!
//! With LOTRACE_EBPF_STUB=1, or when bpf-linker is not installed, an empty stub object is written
//! instead so that `cargo check`, clippy and unprivileged tests never need bpf-linker; a lotrace
//! built that way refuses to trace and says how to build it properly.
//!
//! With LOTRACE_EBPF_FLOOR=1 the object is the bench's empty-hook floor (loopback-ebpf's `floor`
//! feature: every program returns at once). Only `cargo xtask bench` sets it, building that
//! lotrace in a target directory of its own.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    cri_client();
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let ebpf = manifest.join("../loopback-ebpf");
    let common = manifest.join("../loopback-common");
    for p in [
        ebpf.join("src"),
        ebpf.join("Cargo.toml"),
        ebpf.join("Cargo.lock"),
        common.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=LOTRACE_EBPF_STUB");
    println!("cargo:rerun-if-env-changed=LOTRACE_EBPF_FLOOR");
    println!("cargo:rerun-if-env-changed=PATH");
    let dst = out.join("loopback.bpf.o");

    let stub_asked = env::var("LOTRACE_EBPF_STUB").is_ok_and(|v| v == "1" || v == "true");
    if stub_asked {
        write_stub(&dst);
        return;
    }
    if !on_path("bpf-linker") {
        println!(
            "cargo:warning=bpf-linker not found: building lotrace with an empty eBPF stub \
             (run `cargo xtask setup` or `cargo xtask build` for a working binary)"
        );
        write_stub(&dst);
        return;
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(
            env::var("LOTRACE_EBPF_FLOOR")
                .is_ok_and(|v| v == "1")
                .then_some(["--features", "floor"])
                .into_iter()
                .flatten(),
        )
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd.status().expect("failed to run cargo for the eBPF crate");
    if !status.success() {
        panic!("building loopback-ebpf failed ({status}); see the errors above");
    }
    let built = target_dir.join("bpfel-unknown-none/release/loopback");
    std::fs::copy(&built, &dst).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", built.display(), dst.display()));
}

/// The CRI client (runtime.v1's RuntimeService) from the vendored proto, parsed by protox.
fn cri_client() {
    println!("cargo:rerun-if-changed=proto/cri-v1.proto");
    let fds = protox::compile(["cri-v1.proto"], ["proto/"]).expect("parse proto/cri-v1.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)
        .expect("generate the CRI client");
}

fn write_stub(dst: &Path) {
    std::fs::write(dst, b"").expect("write stub eBPF object");
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}
