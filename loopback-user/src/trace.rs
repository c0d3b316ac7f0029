//! `lotrace trace`: live tracing loop.
use std::time::{Duration, Instant};

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    bpf::session::{Session, SessionOptions},
    engine::{Intake, PrintOpts, PrintQueue, clock_ns, kernel_release, monotonic_ns, outputs, pump, summary},
    netns::Netns,
    output::Summary,
    path::{Tracker, TrackerConfig},
    record,
    usage::usage,
};

pub struct TraceConfig {
    pub netns: Netns,
    pub print: PrintOpts,
    pub duration: Option<Duration>,
    pub xdp: bool,
    pub raw_tp: bool,
    pub kernel_cost: bool,
    /// `--write FILE`: record the raw events.
    pub write: Option<PathBuf>,
    /// `--pcapng OUT`.
    pub pcapng: Option<PathBuf>,
    /// `--snaplen N`: packet bytes captured on lo.
    pub snaplen: u32,
}

/// Decodes and reconstructs what is in the ring, queueing finished packets for the printer
/// (which never holds this up: see `PrintQueue`).
fn drain(rb: &mut RingBuf<MapData>, tracker: &mut Tracker, queue: &mut PrintQueue, intake: &mut Intake) -> Result<()> {
    pump(rb, intake, tracker, |ps| {
        queue.send(ps);
        Ok(())
    })?;
    if let Some(r) = &mut intake.recorder {
        r.flush().context("writing the recording")?;
    }
    Ok(())
}

pub async fn run(cfg: TraceConfig) -> Result<()> {
    let mut session = Session::open(&SessionOptions {
        xdp: cfg.xdp,
        raw_tp: cfg.raw_tp,
        kernel_cost: cfg.kernel_cost,
        snaplen: cfg.snaplen,
        ..SessionOptions::new(cfg.netns.clone())
    })?;
    let ring = session.take_ring()?;
    // SAFETY: the ring buffer owns its map fd and lives as long as the AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|_| anyhow::anyhow!("cannot poll the ring buffer fd"))?;
    // The whole plan is attached: every program starts now, at once.
    session.start();
    let mut tracker = Tracker::new(
        TrackerConfig {
            tracing_since_ns: session.switch.on_since_ns,
            ..TrackerConfig::default()
        },
        session.drop_reasons.clone(),
    );
    let header = recording_header(&session, cfg.snaplen);
    let (mut intake, printer) = outputs(cfg.print, cfg.pcapng.as_deref(), &header)?;
    if let Some(path) = &cfg.write {
        intake.recorder =
            Some(record::Writer::create(path, &header).with_context(|| format!("cannot create {}", path.display()))?);
    }
    // Signals are ours before the line saying we are attached: whoever waits for that line may
    // send SIGINT at once.
    let mut sigint = signal(SignalKind::interrupt())?;
    // Fault injection for the "nothing left behind" tests (README, Tests): SIGUSR1 is only
    // listened to when the fault is on (otherwise it keeps its default action).
    let mut fault_signal = match crate::fault::get() {
        crate::fault::Fault::PanicOnSigusr1 => Some(signal(SignalKind::user_defined1())?),
        _ => None,
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    for note in &session.notes {
        eprintln!("lotrace: {note}");
    }
    // Everything is attached and every file is open: nothing from here on needs a capability
    // (but the two that remove classic tc filters, when there are some).
    let privileges = match (
        crate::caps::drop_all_but(session.caps_to_keep()),
        session.caps_to_keep(),
    ) {
        (Ok(()), 0) => "; all capabilities dropped".to_string(),
        (Ok(()), _) => {
            "; all capabilities dropped but CAP_NET_ADMIN and CAP_SYS_ADMIN (to remove the classic tc filters at exit)"
                .to_string()
        }
        (Err(e), _) => format!("; capabilities kept ({e})"),
    };
    // Capabilities are dropped (they belong to threads): now the printer may have a thread of
    // its own, started before the line saying lotrace is attached.
    let mut queue = PrintQueue::start(printer)?;
    let attached = session.outcomes.iter().filter(|o| o.attached).count();
    let missing = crate::bpf::session::describe_missing(&session.outcomes);
    let fallbacks: Vec<String> = session
        .outcomes
        .iter()
        .filter(|o| o.attached && o.fallback_reason.is_some())
        .map(|o| format!("{} as {}", o.program, o.kind))
        .collect();
    let fallbacks = match fallbacks.len() {
        0 => String::new(),
        _ => format!(" (fallbacks: {}; why: `lotrace doctor`)", fallbacks.join(", ")),
    };
    eprintln!(
        "lotrace: tracing network namespace {} (inode {}{}): {attached}/{} hooks attached{fallbacks}{}{privileges}. Ctrl-C to stop.",
        cfg.netns.label,
        cfg.netns.inode,
        owned_by(cfg.netns.owner.as_ref()),
        session.outcomes.iter().filter(|o| o.requested).count(),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; NOT attached: {missing}")
        }
    );
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));

    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let fault = async {
            match &mut fault_signal {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = fault => panic!("LOTRACE_FAULT=panic-on-sigusr1"),
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut tracker, &mut queue, &mut intake)?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                // The kernel wakes this reader only per 256 KiB (batched wake-ups); the rest is
                // picked up here.
                drain(ring.get_mut(), &mut tracker, &mut queue, &mut intake)?;
            }
            _ = tick.tick() => {
                // Everything that happened before `now` is read before anything is expired at
                // `now`: a reader that was not scheduled for a while (a busy or emulated machine)
                // must not expire a packet, or give up waiting for a clone, whose next event is
                // waiting in the ring (the 6.1 guest's echo reply, "dropped" though its clone
                // had been read).
                let now = monotonic_ns();
                drain(ring.get_mut(), &mut tracker, &mut queue, &mut intake)?;
                let mut done = intake.expire(&mut tracker, now)?;
                queue.send(&mut done);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep => break,
        }
        if queue.done() {
            break;
        }
    }
    // Every program goes silent, then what is still in the ring, then everything still held.
    let kernel = session.stop(|| {
        drain(ring.get_mut(), &mut tracker, &mut queue, &mut intake)?;
        Ok(intake.received)
    })?;
    queue.send(&mut tracker.flush());
    let unprinted = queue.unprinted;
    let printer = queue.finish()?;
    let trailer = record::Trailer {
        kernel,
        costs: session.program_costs(),
        costs_unavailable: session.stats_error.clone(),
    };
    let summary = Summary {
        unprinted,
        netns: Some((header.netns_label.clone(), header.netns_inode, header.owner.clone())),
        ..summary(&printer, &intake, trailer.clone())
    };
    if let Some(r) = intake.recorder.take() {
        r.finish(&trailer).context("writing the recording")?;
    }
    printer.finish(&tracker.stats, &summary)
}

/// `, pod shop/web-1 (…)` for a header line; empty for a namespace no one owns.
pub fn owned_by(owner: Option<&crate::owner::Owner>) -> String {
    owner
        .and_then(|o| o.describe())
        .map(|d| format!(", {d}"))
        .unwrap_or_default()
}

/// The self-describing header of a recording (also the clock reference of a live run).
fn recording_header(session: &Session, snaplen: u32) -> record::Header {
    let (monotonic_ns, realtime_ns) = (monotonic_ns(), clock_ns(libc::CLOCK_REALTIME));
    record::Header {
        format_version: record::FORMAT_VERSION,
        lotrace_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: kernel_release(),
        record_size: loopback_common::RAW_EVENT_SIZE as u32,
        netns_label: session.netns.label.clone(),
        netns_inode: session.netns.inode,
        owner: session.netns.owner.clone(),
        monotonic_ns,
        realtime_ns,
        snaplen,
        tracing_since_ns: session.switch.on_since_ns,
        hooks: session
            .outcomes
            .iter()
            .filter(|o| o.requested)
            .map(|o| record::HookInfo {
                program: o.used.to_string(),
                kind: o.kind.to_string(),
                attached: o.attached,
                fallback_reason: o.fallback_reason.clone(),
            })
            .collect(),
        drop_reasons: session.drop_reasons.iter().map(|(k, v)| (*k, v.clone())).collect(),
    }
}

pub struct ReplayConfig {
    pub file: PathBuf,
    pub print: PrintOpts,
    pub pcapng: Option<PathBuf>,
}

/// `lotrace replay FILE`: the same reconstruction and output as the live run, from a recording.
/// A malformed file is a usage error naming the byte offset; what was read before it is printed.
pub fn replay(cfg: ReplayConfig) -> Result<()> {
    let name = cfg.file.display().to_string();
    let bad = |e: record::RecordingError| usage(format!("{name}: {e}"));
    let mut reader = record::Reader::open(&cfg.file).map_err(bad)?;
    let h = reader.header.clone();
    eprintln!(
        "lotrace: replaying {name}: recorded by lotrace {} on kernel {}, network namespace {} (inode {}{}), {}/{} hooks attached",
        h.lotrace_version,
        h.kernel_release,
        h.netns_label,
        h.netns_inode,
        owned_by(h.owner.as_ref()),
        h.hooks.iter().filter(|x| x.attached).count(),
        h.hooks.len()
    );
    let mut tracker = Tracker::new(
        TrackerConfig {
            tracing_since_ns: h.tracing_since_ns,
            ..TrackerConfig::default()
        },
        h.drop_reasons.clone().into_iter().collect(),
    );
    let (mut intake, mut printer) = outputs(cfg.print, cfg.pcapng.as_deref(), &h)?;
    let mut trailer = None;
    loop {
        let frame = match reader.next_frame_ref() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                printer.flush()?;
                return Err(bad(e));
            }
        };
        match frame {
            record::FrameRef::Event(bytes) => intake.take(bytes, &mut tracker, &mut |ps| printer.print_all(ps))?,
            record::FrameRef::Tick(now) => {
                let done = intake.expire(&mut tracker, now)?;
                printer.print_all(&done)?;
            }
            record::FrameRef::Trailer(t) => trailer = Some(t),
        }
    }
    printer.print_all(&tracker.flush())?;
    let t = trailer.unwrap_or_else(|| {
        eprintln!("lotrace: {name}: no trailer (the recording was cut short): the kernel's loss counters are unknown");
        record::Trailer::default()
    });
    let summary = Summary {
        netns: Some((h.netns_label.clone(), h.netns_inode, h.owner.clone())),
        ..summary(&printer, &intake, t)
    };
    printer.finish(&tracker.stats, &summary)
}
