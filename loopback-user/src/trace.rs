//! `lotrace trace`: live tracing loop.
use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    bpf::session::{Session, SessionOptions},
    decode::Decoder,
    filter::Expr,
    netns::Netns,
    output::{Summary, TextStyle, packet_text, summary_json, summary_text, write_packet_json},
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
    pub raw_tp: bool,
    pub kernel_cost: bool,
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

/// Prints finished packets that pass the filter and `--pid`, up to `--count`.
struct Printer<'a> {
    cfg: &'a TraceConfig,
    style: TextStyle,
    out: std::io::BufWriter<std::io::Stdout>,
    printed: u64,
}

impl Printer<'_> {
    fn done(&self) -> bool {
        self.cfg.count.is_some_and(|c| self.printed >= c)
    }

    fn print_all(&mut self, paths: Vec<PacketPath>) -> Result<()> {
        for p in paths {
            if self.done() || !wanted(&p, self.cfg.filter.as_ref(), self.cfg.pid) {
                continue;
            }
            match self.cfg.format {
                Format::Json => write_packet_json(&mut self.out, &p)?,
                Format::Text => write!(self.out, "{}", packet_text(&p, &self.style))?,
            }
            self.printed += 1;
        }
        Ok(())
    }
}

/// Where ring-buffer records enter user space: the stateful decoder and the counts that let the
/// summary account for every record the kernel emitted.
#[derive(Default)]
pub struct Intake {
    pub decoder: Decoder,
    /// Records read from the ring buffer.
    pub received: u64,
    /// Records that did not decode (counted, never dropped silently).
    pub undecodable: u64,
}

impl Intake {
    /// Decodes one record into the tracker, handing finished packets to `sink`.
    pub fn take(
        &mut self,
        bytes: &[u8],
        tracker: &mut Tracker,
        sink: &mut impl FnMut(Vec<PacketPath>) -> Result<()>,
    ) -> Result<()> {
        self.received += 1;
        match self.decoder.decode(bytes) {
            Ok(ev) => sink(tracker.push(ev)),
            Err(_) => {
                self.undecodable += 1;
                Ok(())
            }
        }
    }
}

/// Decodes and reconstructs everything currently in the ring buffer, handing finished packets
/// to `sink` (shared by `trace` and `prove`).
pub fn pump(
    rb: &mut RingBuf<MapData>,
    intake: &mut Intake,
    tracker: &mut Tracker,
    mut sink: impl FnMut(Vec<PacketPath>) -> Result<()>,
) -> Result<()> {
    while let Some(item) = rb.next() {
        intake.take(&item, tracker, &mut sink)?;
    }
    Ok(())
}

fn drain(
    rb: &mut RingBuf<MapData>,
    tracker: &mut Tracker,
    printer: &mut Printer<'_>,
    intake: &mut Intake,
) -> Result<()> {
    pump(rb, intake, tracker, |ps| printer.print_all(ps))?;
    printer.out.flush()?;
    Ok(())
}

pub async fn run(cfg: TraceConfig) -> Result<()> {
    let mut session = Session::open(&SessionOptions {
        xdp: cfg.xdp,
        raw_tp: cfg.raw_tp,
        kernel_cost: cfg.kernel_cost,
        ..SessionOptions::new(cfg.netns.clone())
    })?;
    let ring = session.take_ring()?;
    // SAFETY: the ring buffer owns its map fd and lives as long as the AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|_| anyhow::anyhow!("cannot poll the ring buffer fd"))?;
    let mut tracker = Tracker::new(TrackerConfig::default(), session.drop_reasons.clone());
    let stdout = std::io::stdout();
    let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut printer = Printer {
        cfg: &cfg,
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
    let fallbacks: Vec<&str> = session
        .outcomes
        .iter()
        .filter(|o| o.attached && o.fallback_reason.is_some())
        .map(|o| o.program)
        .collect();
    let fallbacks = match fallbacks.len() {
        0 => String::new(),
        n => format!(
            " ({n} as raw tracepoints: {})",
            session
                .outcomes
                .iter()
                .find_map(|o| o.fallback_reason.as_deref())
                .unwrap_or("")
        ),
    };
    eprintln!(
        "lotrace: tracing network namespace {} (inode {}): {attached}/{} hooks attached{fallbacks}{}. Ctrl-C to stop.",
        cfg.netns.label,
        cfg.netns.inode,
        session.outcomes.iter().filter(|o| o.requested).count(),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; NOT attached: {}", missing.join(", "))
        }
    );
    // Fault injection for the "nothing left behind" tests (README, Tests).
    if std::env::var("LOTRACE_FAULT").is_ok_and(|v| v == "panic-after-attach") {
        panic!("LOTRACE_FAULT=panic-after-attach");
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
    let mut intake = Intake::default();

    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut tracker, &mut printer, &mut intake)?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                // The kernel wakes this reader only per 256 KiB (batched wake-ups); the rest is
                // picked up here.
                drain(ring.get_mut(), &mut tracker, &mut printer, &mut intake)?;
            }
            _ = tick.tick() => {
                printer.print_all(tracker.expire(monotonic_ns()))?;
                printer.out.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep => break,
        }
        if printer.done() {
            break;
        }
    }
    // What is still in the ring, then everything still held.
    drain(ring.get_mut(), &mut tracker, &mut printer, &mut intake)?;
    printer.print_all(tracker.flush())?;
    printer.out.flush()?;
    let summary = Summary {
        printed: printer.printed,
        kernel: session.counters()?,
        undecodable: intake.undecodable,
        received: intake.received,
        unnamed: intake.decoder.unnamed,
        costs: session.program_costs(),
        costs_unavailable: session.stats_error.clone(),
    };
    match printer.cfg.format {
        Format::Json => eprintln!("{}", summary_json(&tracker.stats, &summary)),
        Format::Text => eprint!("{}", summary_text(&tracker.stats, &summary)),
    }
    Ok(())
}
