//! Privileged tests: load the real programs into the running kernel, each test in a throwaway
//! network namespace it creates and removes. Run as root through `cargo xtask test` (one thread).
//! Outside root they skip, saying why; under CI=true they must run.
//!
//! One file per capability; `support` holds the sandbox and launcher code they share.
// The declared list of external tools (`cargo xtask test` installs them): a missing one fails
// with one line naming it and its Debian package.
mod support;
#[allow(dead_code)]
#[path = "../../../xtask/src/tools.rs"]
mod tools;

mod agent;
mod cleanup;
mod containers;
mod filter;
mod kernels;
mod load;
mod otlp;
mod paths;
mod prove;
mod recording;
