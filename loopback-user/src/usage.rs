//! How lotrace fails and writes: usage errors (exit code 2), stdout writes that survive a closed
//! pipe, and telling such a pipe apart from real failures.
use anyhow::Result;

/// An error caused by the user's input: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// Writes `text` to stdout and flushes it; a closed pipe comes back as an error (which `main`
/// turns into a quiet exit), never a panic as with `print!`.
pub fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Whether `e` is, anywhere in its chain, a write to a closed pipe.
pub fn output_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
