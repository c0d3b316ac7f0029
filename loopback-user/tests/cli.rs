//! The real binary's behaviour at its edges that needs no privileges: output into a pipe whose
//! reader has gone (`lotrace replay FILE | head -1`).
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_lotrace");

/// A stdout whose reader is already closed: the first write fails with EPIPE, every run.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// Like other command-line tools, lotrace stops quietly when the reader of its output goes
/// away: exit 0, no error line, no panic, no "Aborted" — in text and in JSON.
#[test]
fn replay_into_a_closed_pipe_stops_quietly() {
    let dir = std::env::temp_dir().join(format!("lotrace-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rec = dir.join("fixture.lotrace");
    loopback_user::fixture::write_recording(&rec, 50).expect("recording");
    for format in ["text", "json"] {
        let out = Command::new(BIN)
            .args(["replay", rec.to_str().expect("utf8"), "--format", format])
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .expect("run lotrace");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{format}: {err}");
        assert!(
            err.lines().all(|l| l.starts_with("lotrace: replaying ")),
            "{format}: only the opening line on stderr: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
