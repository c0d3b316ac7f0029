//! Writes the fixture session as a recording: `cargo run --example fixture_recording -- FILE ROUNDS`
//! (the input of `cargo xtask bench`'s instruction count of `lotrace replay`).
fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(file), rounds) = (args.next(), args.next().and_then(|r| r.parse().ok()).unwrap_or(2_000)) else {
        eprintln!("usage: fixture_recording FILE [ROUNDS]");
        std::process::exit(2);
    };
    if let Err(e) = loopback_user::fixture::write_recording(std::path::Path::new(&file), rounds) {
        eprintln!("fixture_recording: {file}: {e}");
        std::process::exit(1);
    }
}
