//! `lotrace tui`: the live dashboard (ratatui + crossterm on the tokio loop). State and its
//! `update(Msg)` are in `app.rs`, the views (pure functions of the state) in `view.rs`; this
//! file only moves events between the kernel (or a recording), the keyboard and those two.
pub mod app;
pub mod view;

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    bpf::session::{Session, SessionOptions},
    counters::KernelCounters,
    engine::{Intake, monotonic_ns, pump},
    filter::Expr,
    netns::Netns,
    path::{Tracker, TrackerConfig},
    record::{self, Frame},
    usage::usage,
};
use app::{Action, App, Msg};

pub struct TuiConfig {
    pub netns: Option<Netns>,
    pub filter: Option<(String, Expr)>,
    pub replay: Option<PathBuf>,
    /// Replay speed: 1 = as recorded, 0 = as fast as possible.
    pub speed: f64,
}

/// Where the packets come from.
enum Source {
    Live {
        session: Box<Session>,
        ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    },
    Replay {
        reader: Box<record::Reader<std::io::BufReader<std::fs::File>>>,
        /// Recording time of the first event, and when it was replayed.
        start: Option<(u64, Instant)>,
        next: Option<Frame>,
        trailer: Option<record::Trailer>,
        done: bool,
    },
}

/// Own CPU time (user + system) in seconds, from /proc/self/stat.
fn own_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised comm: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf(3) with a constant name has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

pub async fn run(cfg: TuiConfig) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(usage("lotrace tui needs a terminal (use `lotrace trace` for a stream)"));
    }
    let mut tracker;
    let (mut source, mut app) = match &cfg.replay {
        Some(file) => {
            let name = file.display().to_string();
            let reader = record::Reader::open(file).map_err(|e| usage(format!("{name}: {e}")))?;
            let h = reader.header.clone();
            tracker = Tracker::new(
                TrackerConfig {
                    tracing_since_ns: h.tracing_since_ns,
                    ..TrackerConfig::default()
                },
                h.drop_reasons.clone().into_iter().collect(),
            );
            let missing = h
                .hooks
                .iter()
                .filter(|x| !x.attached)
                .map(|x| x.program.clone())
                .collect();
            let mut app = App::new(format!("recording {name} (kernel {})", h.kernel_release), missing);
            app.captured = h.snaplen as usize;
            (
                Source::Replay {
                    reader: Box::new(reader),
                    start: None,
                    next: None,
                    trailer: None,
                    done: false,
                },
                app,
            )
        }
        None => {
            let netns = match &cfg.netns {
                Some(n) => n.clone(),
                None => Netns::current()?,
            };
            // The tracer-cost panel needs the kernel's BPF statistics: on for the dashboard.
            let mut session = Session::open(&SessionOptions {
                kernel_cost: true,
                ..SessionOptions::new(netns.clone())
            })?;
            let ring = session.take_ring()?;
            session.start();
            tracker = Tracker::new(
                TrackerConfig {
                    tracing_since_ns: session.switch.on_since_ns,
                    ..TrackerConfig::default()
                },
                session.drop_reasons.clone(),
            );
            // SAFETY: the ring buffer owns its map fd and lives as long as the AsyncFd.
            let ring =
                unsafe { AsyncFd::register(ring) }.map_err(|_| anyhow::anyhow!("cannot poll the ring buffer fd"))?;
            // Names only: the status line has one line; `lotrace doctor` says why.
            let missing = session.missing().map(|o| o.program.to_string()).collect();
            let app = App::new(
                format!(
                    "netns {} (inode {}{})",
                    netns.label,
                    netns.inode,
                    crate::trace::owned_by(netns.owner.as_ref())
                ),
                missing,
            );
            (
                Source::Live {
                    session: Box::new(session),
                    ring,
                },
                app,
            )
        }
    };
    if let Some((text, f)) = cfg.filter {
        f.check_capture(app.captured).map_err(usage)?;
        app.filter = Some(f);
        app.filter_text = text;
    }
    // Attached (or reading a file): no capability is needed any more (see caps.rs). Dropped
    // before the keyboard thread exists.
    let keep = match &source {
        Source::Live { session, .. } => session.caps_to_keep(),
        _ => 0,
    };
    if let Err(e) = crate::caps::drop_all_but(keep) {
        app.missing.push(format!("capabilities kept: {e}"));
    }
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let res = event_loop(&mut terminal, &mut app, &mut source, &mut tracker, cfg.speed).await;
    ratatui::restore();
    res
}

/// Keyboard events from a blocking reader thread (crossterm's poll/read), until `stop`.
fn keys(stop: Arc<AtomicBool>) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if event::poll(Duration::from_millis(50)).unwrap_or(false) {
                match event::read() {
                    Ok(e) => {
                        if tx.send(e).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    });
    rx
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    source: &mut Source,
    tracker: &mut Tracker,
    speed: f64,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut input = keys(stop.clone());
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut intake = Intake::default();
    let mut drain = tokio::time::interval(Duration::from_millis(10));
    let mut expire = tokio::time::interval(Duration::from_millis(250));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut redraw = tokio::time::interval(Duration::from_millis(100));
    let (mut last_tick, mut last_cpu) = (Instant::now(), own_cpu_secs());
    let result = loop {
        let mut packets = Vec::new();
        let mut quit = false;
        // Packet bytes are kept while the filter tests them (and only then: a copy per packet).
        intake.decoder.keep_wire = app.filter.as_ref().is_some_and(Expr::reads_bytes);
        intake.decoder.wire_cap = Some(app.captured);
        tokio::select! {
            k = input.recv() => match k {
                Some(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    quit = app.update(Msg::Key(k)) == Action::Quit;
                    terminal.draw(|f| view::view(app, f))?;
                }
                Some(Event::Resize(..)) => { terminal.draw(|f| view::view(app, f))?; }
                Some(_) => {}
                None => quit = true,
            },
            _ = drain.tick() => match source {
                Source::Live { ring, .. } => pump(ring.get_mut(), &mut intake, tracker, |ps| { packets.append(ps); Ok(()) })?,
                Source::Replay { reader, start, next, trailer, done } => {
                    if !*done {
                        replay_step(reader, start, next, trailer, done, &mut intake, tracker, speed, &mut packets)?;
                        if *done {
                            packets.extend(tracker.flush());
                            app.update(Msg::Packets(std::mem::take(&mut packets)));
                            app.update(Msg::End);
                        }
                    }
                }
            },
            _ = expire.tick() => {
                if let Source::Live { ring, .. } = source {
                    // What happened before `now` is read first (see trace's expiry).
                    let now = monotonic_ns();
                    pump(ring.get_mut(), &mut intake, tracker, |ps| { packets.append(ps); Ok(()) })?;
                    packets.extend(intake.expire(tracker, now)?);
                }
            }
            _ = second.tick() => {
                let now = Instant::now();
                let secs = now.duration_since(last_tick).as_secs_f64();
                let cpu = own_cpu_secs();
                let (kernel, costs) = match source {
                    Source::Live { session, .. } => (session.counters().unwrap_or_default(), session.program_costs()),
                    Source::Replay { trailer, .. } => trailer.as_ref().map(|t| (t.kernel, t.costs.clone())).unwrap_or((KernelCounters::default(), Vec::new())),
                };
                app.update(Msg::Tick { secs, kernel, expired: tracker.stats.expired, costs, cpu_share: if secs > 0.0 { (cpu - last_cpu) / secs } else { 0.0 } });
                (last_tick, last_cpu) = (now, cpu);
            }
            _ = redraw.tick() => {
                terminal.draw(|f| view::view(app, f))?;
                // Fault injection for the terminal-restore test (README, Tests).
                if *crate::fault::get() == crate::fault::Fault::PanicInTui && app.packets > 0 {
                    panic!("LOTRACE_FAULT=panic-in-tui");
                }
            }
            _ = sigterm.recv() => quit = true,
            _ = sigint.recv() => quit = true,
        }
        if !packets.is_empty() {
            app.update(Msg::Packets(packets));
        }
        if quit {
            break Ok(());
        }
    };
    stop.store(true, Ordering::Relaxed);
    result
}

/// Feeds the recording's frames that are due (by their recorded time, scaled by `speed`).
#[allow(clippy::too_many_arguments)]
fn replay_step(
    reader: &mut record::Reader<std::io::BufReader<std::fs::File>>,
    start: &mut Option<(u64, Instant)>,
    next: &mut Option<Frame>,
    trailer: &mut Option<record::Trailer>,
    done: &mut bool,
    intake: &mut Intake,
    tracker: &mut Tracker,
    speed: f64,
    packets: &mut Vec<crate::path::PacketPath>,
) -> Result<()> {
    // Bounded work per step, so keys stay responsive at any speed.
    for _ in 0..20_000 {
        let frame = match next.take() {
            Some(f) => f,
            None => match reader.next_frame().map_err(|e| anyhow::anyhow!("recording: {e}"))? {
                Some(f) => f,
                None => {
                    *done = true;
                    return Ok(());
                }
            },
        };
        match frame {
            Frame::Event(bytes) => {
                let ts = crate::decode::record_ts(&bytes);
                let (t0, w0) = *start.get_or_insert((ts, Instant::now()));
                if speed > 0.0 {
                    let due = Duration::from_secs_f64(ts.saturating_sub(t0) as f64 / 1e9 / speed);
                    if w0.elapsed() < due {
                        *next = Some(Frame::Event(bytes));
                        return Ok(());
                    }
                }
                intake.take(&bytes, tracker, &mut |ps| {
                    packets.append(ps);
                    Ok(())
                })?;
            }
            Frame::Tick(now) => packets.extend(intake.expire(tracker, now)?),
            Frame::Trailer(t) => *trailer = Some(t),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::{app::*, view::view};
    use crate::fixture;
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    /// The dashboard after the fixture session and two one-second ticks (fixed input: the
    /// same screen every time).
    fn app() -> App {
        let mut app = App::new(
            "recording fixture.lotrace (kernel fixture)".into(),
            // As on this kernel: no fentry/kprobe for the socket-send step.
            vec!["fib_table_lookup".into(), "inet_sendmsg".into(), "inet6_sendmsg".into()],
        );
        // Ticks at the same hook event whether or not the lo chains come staged.
        let mut events = 0u64;
        fixture::reconstruct_each(fixture::session(24), |done, n| {
            let before = events;
            events += n;
            app.update(Msg::Packets(done));
            if before <= 300 && events > 300 {
                app.update(Msg::Tick {
                    secs: 1.0,
                    kernel: Default::default(),
                    expired: 0,
                    costs: vec![],
                    cpu_share: 0.0,
                });
            }
        });
        app.update(Msg::Tick {
            secs: 1.0,
            kernel: Default::default(),
            expired: 0,
            costs: vec![crate::counters::ProgramCost {
                program: "net_dev_queue".into(),
                runs: 100,
                total_ns: 25_000,
            }],
            cpu_share: 0.012,
        });
        app
    }

    fn screen(app: &App, w: u16, h: u16) -> String {
        let mut term = Terminal::new(TestBackend::new(w, h)).expect("terminal");
        term.draw(|f| view(app, f)).expect("draw");
        term.backend().to_string()
    }

    fn key(app: &mut App, c: KeyCode) {
        app.update(Msg::Key(KeyEvent::new(c, KeyModifiers::NONE)));
    }

    #[test]
    fn dashboard_80x24() {
        insta::assert_snapshot!(screen(&app(), 80, 24));
    }

    #[test]
    fn dashboard_120x40() {
        insta::assert_snapshot!(screen(&app(), 120, 40));
    }

    #[test]
    fn inspector_80x24_and_120x40() {
        let mut a = app();
        key(&mut a, KeyCode::Enter);
        insta::assert_snapshot!("inspector_80x24", screen(&a, 80, 24));
        key(&mut a, KeyCode::Left);
        insta::assert_snapshot!("inspector_120x40", screen(&a, 120, 40));
    }

    #[test]
    fn help_filter_error_and_pause_80x24() {
        let mut a = app();
        key(&mut a, KeyCode::Char('?'));
        insta::assert_snapshot!("help_80x24", screen(&a, 80, 24));
        key(&mut a, KeyCode::Esc);
        key(&mut a, KeyCode::Char('/'));
        for c in "port 70000".chars() {
            key(&mut a, KeyCode::Char(c));
        }
        insta::assert_snapshot!("filter_editing_80x24", screen(&a, 80, 24));
        key(&mut a, KeyCode::Enter);
        key(&mut a, KeyCode::Char('p'));
        key(&mut a, KeyCode::Tab);
        insta::assert_snapshot!("filter_error_paused_80x24", screen(&a, 80, 24));
    }
}
