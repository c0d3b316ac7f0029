//! `lotrace trace`: live tracing loop.
use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    bpf::session::{Session, SessionOptions},
    decode::decode,
    filter::Expr,
    netns::Netns,
    output::{Summary, TextStyle, packet_json, packet_text, summary_json, summary_text},
    path::{PacketPath, Tracker, TrackerConfig},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub struct TraceConfig {
    pub netns: Netns,
    pub filter: Option<Expr>,
    pub pid: Option<u32>,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub format: Format,
    pub xdp: bool,
}

pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Same clock as `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn wanted(p: &PacketPath, filter: Option<&Expr>, pid: Option<u32>) -> bool {
    if let Some(f) = filter {
        match &p.info {
            Some(i) if f.matches(i) => {}
            _ => return false,
        }
    }
    if let Some(pid) = pid
        && !p.stages.iter().any(|s| s.pid == pid)
    {
        return false;
    }
    true
}

struct Printer {
    format: Format,
    style: TextStyle,
    out: std::io::BufWriter<std::io::Stdout>,
    printed: u64,
}

impl Printer {
    fn print(&mut self, p: &PacketPath) -> Result<()> {
        match self.format {
            Format::Json => writeln!(self.out, "{}", packet_json(p))?,
            Format::Text => write!(self.out, "{}", packet_text(p, &self.style))?,
        }
        self.printed += 1;
        Ok(())
    }
}

pub async fn run(cfg: TraceConfig) -> Result<()> {
    let mut session = Session::open(&SessionOptions {
        xdp: cfg.xdp,
        ..SessionOptions::new(cfg.netns.clone())
    })?;
    let ring = session.take_ring()?;
    // SAFETY: the ring buffer owns its map fd and lives as long as the AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|_| anyhow::anyhow!("cannot poll the ring buffer fd"))?;
    let mut tracker = Tracker::new(TrackerConfig::default(), session.drop_reasons.clone());
    let stdout = std::io::stdout();
    let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut printer = Printer {
        format: cfg.format,
        style: TextStyle {
            color,
            wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128,
        },
        out: std::io::BufWriter::new(stdout),
        printed: 0,
    };
    let attached = session.outcomes.iter().filter(|o| o.attached).count();
    let missing: Vec<String> = session
        .missing()
        .map(|o| format!("{} ({})", o.program, o.error.as_deref().unwrap_or("?")))
        .collect();
    eprintln!(
        "lotrace: tracing network namespace {} (inode {}): {attached}/{} hooks attached{}. Ctrl-C to stop.",
        cfg.netns.label,
        cfg.netns.inode,
        session.outcomes.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; NOT attached: {}", missing.join(", "))
        }
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut undecodable = 0u64;
    let limit_reached = |printed: u64| cfg.count.is_some_and(|c| printed >= c);

    'outer: loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    match decode(&item) {
                        Ok(ev) => {
                            for p in tracker.push(ev) {
                                if wanted(&p, cfg.filter.as_ref(), cfg.pid) && !limit_reached(printer.printed) {
                                    printer.print(&p)?;
                                }
                            }
                        }
                        Err(_) => undecodable += 1,
                    }
                }
                guard.clear_ready();
                printer.out.flush()?;
                if limit_reached(printer.printed) { break 'outer; }
            }
            _ = tick.tick() => {
                for p in tracker.expire(monotonic_ns()) {
                    if wanted(&p, cfg.filter.as_ref(), cfg.pid) && !limit_reached(printer.printed) {
                        printer.print(&p)?;
                    }
                }
                printer.out.flush()?;
                if limit_reached(printer.printed) { break 'outer; }
            }
            _ = sigint.recv() => break 'outer,
            _ = sigterm.recv() => break 'outer,
            _ = sleep => break 'outer,
        }
    }
    // Drain what is still in the ring, then everything still held.
    {
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            match decode(&item) {
                Ok(ev) => {
                    for p in tracker.push(ev) {
                        if wanted(&p, cfg.filter.as_ref(), cfg.pid) && !limit_reached(printer.printed) {
                            printer.print(&p)?;
                        }
                    }
                }
                Err(_) => undecodable += 1,
            }
        }
    }
    for p in tracker.flush() {
        if wanted(&p, cfg.filter.as_ref(), cfg.pid) && !limit_reached(printer.printed) {
            printer.print(&p)?;
        }
    }
    printer.out.flush()?;
    let summary = Summary {
        printed: printer.printed,
        kernel: session.counters()?,
        undecodable,
    };
    match cfg.format {
        Format::Json => eprintln!("{}", summary_json(&tracker.stats, &summary)),
        Format::Text => eprint!("{}", summary_text(&tracker.stats, &summary)),
    }
    Ok(())
}
