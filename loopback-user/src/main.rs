use std::io::Write as _;

use clap::Parser;
use loopback_user::{
    cli::{Cli, dispatch},
    usage::{UsageError, output_closed},
};

fn main() {
    // A bug must still end in one line, not a backtrace. Everything lotrace attached is owned by
    // file descriptors, so the kernel detaches it when the process ends, panic included.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // Not eprintln!: it panics when stderr is gone, and a panic inside the hook aborts.
        let _ = writeln!(
            std::io::stderr(),
            "lotrace: internal error: {msg}{at} (please report this)"
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                });
            }
            // One line: clap's first line names the problem.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("lotrace: {first} (see lotrace --help)");
            std::process::exit(2);
        }
    };
    // One thread: the tracing commands drop every capability once attached, and capabilities
    // belong to threads (see caps.rs).
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lotrace: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        // The reader of our output went away (`lotrace doctor | head -5`): stop quietly, as other
        // command-line tools do. Everything was already cleaned up on the way here.
        Err(e) if output_closed(&e) => 0,
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("lotrace: {line}");
            if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 }
        }
    };
    std::process::exit(code);
}
