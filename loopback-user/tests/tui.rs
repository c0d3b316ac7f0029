//! The real `lotrace tui` binary in a pseudo-terminal (util-linux `script`), driven by a
//! recording: it draws, answers keys, quits on `q`, and leaves the terminal as it found it.
//! Needs no privileges.
use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_lotrace");

/// A fixture recording in a fresh directory: (directory, file).
fn recording(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("lotrace-tui-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rec = dir.join("fixture.lotrace");
    loopback_user::fixture::write_recording(&rec, 50).expect("recording");
    (dir, rec)
}

#[test]
fn tui_replays_a_recording_in_a_terminal_and_restores_it() {
    let (dir, rec) = recording("keys");
    let cmd = format!(
        "stty cols 100 rows 40; {BIN} tui --replay {} --speed 0; echo EXIT=$?; stty -a",
        rec.display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = screen.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            sink.lock().expect("screen").extend_from_slice(&chunk[..n]);
        }
    });
    // Each key is pressed once the screen shows what the previous one should have drawn (new
    // output only), never after a fixed pause: the dashboard, help, then (any key closes help,
    // Enter opens the inspector) the inspector, then quit.
    let mut seen = 0;
    for (wait_for, keys) in [("top flows", "?"), ("closes", "x\r"), ("delta", "q")] {
        let start = Instant::now();
        loop {
            let out = screen.lock().expect("screen").clone();
            if let Some(i) = out[seen..]
                .windows(wait_for.len())
                .position(|w| w == wait_for.as_bytes())
            {
                seen += i + wait_for.len();
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!(
                    "the screen never showed {wait_for:?}: {}",
                    String::from_utf8_lossy(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stdin.write_all(keys.as_bytes()).expect("key");
        stdin.flush().expect("flush");
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("lotrace tui did not quit on q");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    reader.join().expect("reader");
    let out = String::from_utf8_lossy(&screen.lock().expect("screen")).to_string();
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(p) = std::env::var("LOTRACE_TUI_TEST_DUMP") {
        let _ = std::fs::write(p, &out);
    }
    assert!(status.success(), "{out}");
    assert!(out.contains("EXIT=0"), "tui exit code: {out}");
    // The terminal output moves the cursor over blanks, so words are checked, not phrases:
    // the dashboard, the softirq panel, the flows, the help ("keys"), the inspector ("stage").
    // ... and the selected step's latency histogram ("bucket").
    for want in [
        "lotrace", "loopback", "softirq", "flows", "keys", "stage", "delta", "bucket",
    ] {
        assert!(out.contains(want), "screen lacks {want:?}");
    }
    // Restored: alternate screen left and cursor shown after the last draw, and the tty is back
    // in canonical mode with echo (stty -a prints "icanon" and "echo", not "-icanon"/"-echo").
    let leave = out.rfind("\x1b[?1049l").expect("left the alternate screen");
    assert!(out.rfind("\x1b[?1049h").is_some_and(|enter| enter < leave));
    assert!(out[leave..].contains("\x1b[?25h") || out[..leave].rfind("\x1b[?25h").is_some());
    let stty = &out[out.find("EXIT=").expect("exit")..];
    assert!(
        stty.contains(" icanon") && stty.contains(" echo") && !stty.contains("-icanon"),
        "{stty}"
    );
}

#[test]
fn a_panic_in_the_dashboard_restores_the_terminal_and_prints_one_line() {
    let (dir, rec) = recording("panic");
    let cmd = format!(
        "stty cols 100 rows 30; LOTRACE_FAULT=panic-in-tui {BIN} tui --replay {} --speed 0; echo EXIT=$?; stty -a",
        rec.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux)");
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let leave = out.rfind("\x1b[?1049l").expect("left the alternate screen");
    let after = &out[leave..];
    assert!(
        after.contains("lotrace: internal error: LOTRACE_FAULT=panic-in-tui"),
        "{after}"
    );
    assert!(!after.contains("stack backtrace"), "{after}");
    assert!(after.contains("EXIT=101") || after.contains("EXIT=1"), "{after}");
    let stty = &out[out.find("EXIT=").expect("exit")..];
    assert!(
        stty.contains(" icanon") && stty.contains(" echo") && !stty.contains("-icanon"),
        "{stty}"
    );
}
