//! Dashboard state and its one mutation point, [`App::update`]: testable without a terminal.
use std::collections::{BTreeMap, HashMap, VecDeque};

use hdrhistogram::Histogram;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::{
    counters::{KernelCounters, ProgramCost},
    decode::proto_name,
    filter::{self, Expr},
    hooks::{PLAN, STEPS, Step},
    path::{PacketPath, SoftirqContext, StageKind},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panel {
    Path,
    Flows,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Packets,
    Bytes,
    P99,
}

impl SortKey {
    fn next(self) -> Self {
        match self {
            SortKey::Packets => SortKey::Bytes,
            SortKey::Bytes => SortKey::P99,
            SortKey::P99 => SortKey::Packets,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Packets => "packets",
            SortKey::Bytes => "bytes",
            SortKey::P99 => "p99",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: String,
    pub src: String,
    pub dst: String,
}

pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
    pub latency: Histogram<u64>,
    /// The most recent packets (for the inspector), oldest first.
    pub recent: VecDeque<PacketPath>,
    pub last_seen: u64,
}

/// Per step: packets seen in this and the last interval, and stage latencies.
#[derive(Default)]
pub struct StepStat {
    pub window: u64,
    pub rate: f64,
    pub latency: Option<Histogram<u64>>,
}

pub struct Inspector {
    pub flow: FlowKey,
    /// Index into the flow's recent packets.
    pub index: usize,
}

/// Inputs of [`App::update`].
pub enum Msg {
    Key(KeyEvent),
    /// Finished packets from the reconstruction.
    Packets(Vec<PacketPath>),
    /// Once a second: kernel counters, expired packets so far, program costs, own CPU share.
    Tick {
        secs: f64,
        kernel: KernelCounters,
        expired: u64,
        costs: Vec<ProgramCost>,
        cpu_share: f64,
    },
    /// The input ended (replay reached the end of the recording).
    End,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
}

pub const MAX_FLOWS: usize = 4096;
pub const RECENT_PER_FLOW: usize = 32;
/// Samples of the softirq context chart (one per tick).
pub const HISTORY: usize = 60;

pub struct App {
    /// What is traced: "netns X (inode N)" or "recording FILE".
    pub source: String,
    /// Hooks that are not attached (or were not in the recording), with why.
    pub missing: Vec<String>,
    pub paused: bool,
    pub ended: bool,
    pub filter: Option<Expr>,
    pub filter_text: String,
    /// Bytes captured per packet (the recording's `--snaplen`; the header capture live): a
    /// filter that tests bytes past them is refused.
    pub captured: usize,
    /// Some while the filter line is being edited.
    pub editing: Option<String>,
    pub error: Option<String>,
    pub focus: Panel,
    pub path_row: usize,
    pub flow_row: usize,
    pub sort: SortKey,
    pub inspector: Option<Inspector>,
    pub help: bool,
    pub packets: u64,
    /// Packets that arrived while paused (not shown).
    pub skipped: u64,
    pub steps: Vec<StepStat>,
    pub flows: HashMap<FlowKey, Flow>,
    /// Per CPU: [inline, ksoftirqd, other] in the current interval, and the history of shares.
    pub softirq_now: BTreeMap<u32, [u64; 3]>,
    pub softirq_hist: BTreeMap<u32, VecDeque<[u64; 3]>>,
    pub drops: BTreeMap<String, u64>,
    pub kernel: KernelCounters,
    pub expired: u64,
    /// Packets cut by the start or the end of tracing: counted apart, in no view.
    pub partial: u64,
    pub costs: Vec<ProgramCost>,
    pub cpu_share: f64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid histogram bounds")
}

impl App {
    /// Whether step `s` can show anything here: some hook point of the plan (`hooks/plan.rs`) that
    /// serves one of its stages is attached (steps whose stages no hook point marks on its own,
    /// the softirq ones, are derived and always shown).
    pub fn observable(&self, s: &Step) -> bool {
        let missing = |name: &str| {
            self.missing
                .iter()
                .any(|m| m == name || m.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        };
        let mut serving = PLAN
            .iter()
            .filter(|hp| hp.hook.is_some_and(|h| s.stages.contains(&StageKind::of(h))))
            .peekable();
        !s.stages.is_empty() && (serving.peek().is_none() || serving.any(|hp| !missing(hp.name)))
    }

    pub fn new(source: String, missing: Vec<String>) -> Self {
        Self {
            source,
            missing,
            paused: false,
            ended: false,
            filter: None,
            filter_text: String::new(),
            captured: loopback_common::HDR_CAP,
            editing: None,
            error: None,
            focus: Panel::Flows,
            path_row: 0,
            flow_row: 0,
            sort: SortKey::Packets,
            inspector: None,
            help: false,
            packets: 0,
            skipped: 0,
            steps: STEPS.iter().map(|_| StepStat::default()).collect(),
            flows: HashMap::new(),
            softirq_now: BTreeMap::new(),
            softirq_hist: BTreeMap::new(),
            drops: BTreeMap::new(),
            kernel: KernelCounters::default(),
            expired: 0,
            partial: 0,
            costs: Vec::new(),
            cpu_share: 0.0,
        }
    }

    pub fn update(&mut self, msg: Msg) -> Action {
        match msg {
            Msg::Key(k) => return self.key(k),
            Msg::Packets(ps) => {
                for p in ps {
                    if self.paused {
                        self.skipped += 1;
                    } else if p.partial() {
                        self.partial += 1;
                    } else if self.wanted(&p) {
                        self.add(p);
                    }
                }
            }
            Msg::Tick {
                secs,
                kernel,
                expired,
                costs,
                cpu_share,
            } => {
                self.kernel = kernel;
                self.expired = expired;
                self.costs = costs;
                self.cpu_share = cpu_share;
                if !self.paused {
                    for s in &mut self.steps {
                        s.rate = if secs > 0.0 { s.window as f64 / secs } else { 0.0 };
                        s.window = 0;
                    }
                    for (cpu, now) in std::mem::take(&mut self.softirq_now) {
                        let h = self.softirq_hist.entry(cpu).or_default();
                        h.push_back(now);
                        if h.len() > HISTORY {
                            h.pop_front();
                        }
                    }
                }
            }
            Msg::End => self.ended = true,
        }
        Action::None
    }

    fn wanted(&self, p: &PacketPath) -> bool {
        self.filter.as_ref().is_none_or(|f| f.passes(p))
    }

    /// Counts one finished packet into every view.
    fn add(&mut self, p: PacketPath) {
        // Packets are lo crossings, as in the summary; a socket's copy is shown, not counted.
        if !p.is_copy() {
            self.packets += 1;
        }
        for (i, step) in STEPS.iter().enumerate() {
            if p.stages.iter().any(|s| step.stages.contains(&s.stage)) {
                self.steps[i].window += 1;
            }
        }
        // Latency of a step: from the previous stage of the packet to this step's first stage.
        for (stage, d) in p.timed_stages().skip(1) {
            if let Some(i) = STEPS.iter().position(|s| s.stages.contains(&stage.stage)) {
                let _ = self.steps[i].latency.get_or_insert_with(hist).record(d.max(1));
            }
        }
        if let Some(s) = &p.softirq {
            let slot = match s.context {
                SoftirqContext::Inline => 0,
                SoftirqContext::Ksoftirqd => 1,
                SoftirqContext::Other => 2,
            };
            self.softirq_now.entry(s.cpu).or_default()[slot] += 1;
        }
        // Counted as the summary counts them: a NO_SOCKET original whose clone was delivered
        // is not a drop.
        if let Some(r) = p.drop_label() {
            *self.drops.entry(r).or_default() += 1;
        }
        let key = flow_key(&p);
        if !self.flows.contains_key(&key) && self.flows.len() >= MAX_FLOWS {
            // Bounded memory: forget the flow seen least recently.
            if let Some(old) = self
                .flows
                .iter()
                .min_by_key(|(_, f)| f.last_seen)
                .map(|(k, _)| k.clone())
            {
                self.flows.remove(&old);
            }
        }
        let f = self.flows.entry(key).or_insert_with(|| Flow {
            packets: 0,
            bytes: 0,
            latency: hist(),
            recent: VecDeque::new(),
            last_seen: 0,
        });
        f.packets += 1;
        f.bytes += p.len as u64;
        f.last_seen = p.last_ts();
        let _ = f.latency.record(p.last_ts().saturating_sub(p.first_ts()).max(1));
        f.recent.push_back(p);
        if f.recent.len() > RECENT_PER_FLOW {
            f.recent.pop_front();
        }
    }

    /// Flows in display order.
    pub fn flow_rows(&self) -> Vec<(&FlowKey, &Flow)> {
        let mut v: Vec<(&FlowKey, &Flow)> = self.flows.iter().collect();
        match self.sort {
            SortKey::Packets => v.sort_by(|a, b| b.1.packets.cmp(&a.1.packets).then(a.0.cmp(b.0))),
            SortKey::Bytes => v.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0))),
            SortKey::P99 => v.sort_by(|a, b| {
                b.1.latency
                    .value_at_quantile(0.99)
                    .cmp(&a.1.latency.value_at_quantile(0.99))
                    .then(a.0.cmp(b.0))
            }),
        }
        v
    }

    fn reset_views(&mut self) {
        self.packets = 0;
        self.steps = STEPS.iter().map(|_| StepStat::default()).collect();
        self.flows.clear();
        self.softirq_now.clear();
        self.softirq_hist.clear();
        self.drops.clear();
        self.flow_row = 0;
        self.inspector = None;
    }

    fn key(&mut self, k: KeyEvent) -> Action {
        let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl_c {
            return Action::Quit;
        }
        if let Some(text) = &mut self.editing {
            match k.code {
                KeyCode::Esc => self.editing = None,
                KeyCode::Enter => {
                    let text = std::mem::take(text);
                    self.editing = None;
                    if text.trim().is_empty() {
                        self.filter = None;
                        self.filter_text.clear();
                        self.error = None;
                        self.reset_views();
                    } else {
                        match filter::parse(&text).map_err(|e| e.to_string()).and_then(|f| {
                            f.check_capture(self.captured)?;
                            Ok(f)
                        }) {
                            Ok(f) => {
                                self.filter = Some(f);
                                self.filter_text = text;
                                self.error = None;
                                self.reset_views();
                            }
                            // A bad filter keeps the old one.
                            Err(e) => self.error = Some(format!("filter {text:?}: {e}")),
                        }
                    }
                }
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return Action::None;
        }
        if self.help {
            self.help = false;
            return if k.code == KeyCode::Char('q') {
                Action::Quit
            } else {
                Action::None
            };
        }
        if let Some(ins) = &mut self.inspector {
            let n = self.flows.get(&ins.flow).map(|f| f.recent.len()).unwrap_or(0);
            match k.code {
                KeyCode::Esc | KeyCode::Enter | KeyCode::Backspace => self.inspector = None,
                KeyCode::Left | KeyCode::Up => ins.index = ins.index.saturating_sub(1),
                KeyCode::Right | KeyCode::Down => ins.index = (ins.index + 1).min(n.saturating_sub(1)),
                KeyCode::Char('q') => return Action::Quit,
                _ => {}
            }
            return Action::None;
        }
        match k.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char('/') => self.editing = Some(self.filter_text.clone()),
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Panel::Path => Panel::Flows,
                    Panel::Flows => Panel::Path,
                }
            }
            KeyCode::Up => match self.focus {
                Panel::Path => self.path_row = self.path_row.saturating_sub(1),
                Panel::Flows => self.flow_row = self.flow_row.saturating_sub(1),
            },
            KeyCode::Down => match self.focus {
                Panel::Path => self.path_row = (self.path_row + 1).min(STEPS.len() - 1),
                Panel::Flows => self.flow_row = (self.flow_row + 1).min(self.flows.len().saturating_sub(1)),
            },
            KeyCode::Enter if self.focus == Panel::Flows => {
                if let Some((key, f)) = self.flow_rows().get(self.flow_row) {
                    // On the newest packet that crossed lo, not on a socket's copy of it (a raw
                    // socket's clone of a ping reply arrives after the reply itself).
                    let index = f
                        .recent
                        .iter()
                        .rposition(|p| !p.is_copy())
                        .unwrap_or(f.recent.len().saturating_sub(1));
                    self.inspector = Some(Inspector {
                        flow: (*key).clone(),
                        index,
                    });
                }
            }
            _ => {}
        }
        Action::None
    }
}

pub fn flow_key(p: &PacketPath) -> FlowKey {
    match &p.info {
        Some(i) => {
            let ep = |a: &std::net::IpAddr, port: Option<u16>| match port {
                Some(port) if a.is_ipv6() => format!("[{a}]:{port}"),
                Some(port) => format!("{a}:{port}"),
                None => a.to_string(),
            };
            FlowKey {
                proto: proto_name(i.proto),
                src: ep(&i.src, i.sport),
                dst: ep(&i.dst, i.dport),
            }
        }
        // A record whose bytes were not captured (a crossing seen by hooks that carry no
        // headers only): shown under that name, never as a flow between unknown ends.
        None => FlowKey {
            proto: "-".into(),
            src: "(headers not captured)".into(),
            dst: "-".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_send_is_unseen_only_where_its_hook_is_missing() {
        let step = STEPS.iter().find(|s| s.name == "socket send").expect("step");
        assert!(App::new("x".into(), vec![]).observable(step));
        assert!(!App::new("x".into(), vec!["inet_sendmsg".into(), "inet6_sendmsg".into()]).observable(step));
        assert!(
            !App::new(
                "x".into(),
                vec!["inet_sendmsg (fentry: EPERM)".into(), "inet6_sendmsg".into()]
            )
            .observable(step)
        );
        assert!(App::new("x".into(), vec!["inet_sendmsg".into(), "inet6_sendmsg_other".into()]).observable(step));
    }
    use crate::fixture;

    pub fn fed(rounds: u64) -> App {
        let mut app = App::new(
            "fixture".into(),
            vec![
                "fib_table_lookup (not attached)".into(),
                "inet_sendmsg".into(),
                "inet6_sendmsg".into(),
            ],
        );
        fixture::reconstruct_each(fixture::session(rounds), |done, _| {
            app.update(Msg::Packets(done));
        });
        app
    }

    /// No pseudo-flow: a packet cut by the start or end of tracing is counted apart and in no
    /// view, and a record without captured headers is named for what it is.
    #[test]
    fn the_flow_table_shows_only_packet_flows() {
        let mut app = fed(2);
        let (flows, packets) = (app.flows.len(), app.packets);
        let mut cut = app
            .flows
            .values()
            .next()
            .and_then(|f| f.recent.back())
            .cloned()
            .expect("a packet");
        cut.in_flight_at_start = true;
        let mut headless = cut.clone();
        headless.in_flight_at_start = false;
        headless.info = None;
        app.update(Msg::Packets(vec![cut]));
        assert_eq!((app.flows.len(), app.packets, app.partial), (flows, packets, 1));
        app.update(Msg::Packets(vec![headless]));
        assert!(app.flows.keys().all(|k| k.src != "?" && k.dst != "?"));
        assert!(app.flows.keys().any(|k| k.src == "(headers not captured)"));
    }

    fn key(c: KeyCode) -> Msg {
        Msg::Key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    #[test]
    fn packets_fill_steps_flows_contexts_and_drops() {
        let app = fed(12);
        assert_eq!(app.packets, 32);
        let rows = app.flow_rows();
        assert_eq!(rows[0].1.packets, 12, "UDP request flow first");
        assert_eq!(app.drops.get("NO_SOCKET"), Some(&2));
        let ctx: u64 = app.softirq_now.values().map(|c| c[1]).sum();
        assert!(ctx >= 2, "ksoftirqd runs counted");
        let route = STEPS.iter().position(|s| s.name == "lo transmit").expect("step");
        assert_eq!(app.steps[route].window, 32);
    }

    #[test]
    fn keys_pause_sort_select_and_inspect() {
        let mut app = fed(12);
        assert_eq!(app.update(key(KeyCode::Char('p'))), Action::None);
        assert!(app.paused);
        app.update(Msg::Packets(
            fed(1).flows.values().flat_map(|f| f.recent.clone()).collect(),
        ));
        assert_eq!(
            (app.packets, app.skipped),
            (32, 4),
            "paused: nothing counted, all accounted"
        );
        app.update(key(KeyCode::Char('p')));
        app.update(key(KeyCode::Char('s')));
        assert_eq!(app.sort, SortKey::Bytes);
        app.update(key(KeyCode::Down));
        assert_eq!(app.flow_row, 1);
        app.update(key(KeyCode::Enter));
        let ins = app.inspector.as_ref().expect("inspector open");
        let last = ins.index;
        app.update(key(KeyCode::Left));
        assert_eq!(app.inspector.as_ref().map(|i| i.index), Some(last - 1));
        app.update(key(KeyCode::Esc));
        assert!(app.inspector.is_none());
        app.update(key(KeyCode::Tab));
        assert_eq!(app.focus, Panel::Path);
        app.update(key(KeyCode::Down));
        assert_eq!(app.path_row, 1);
        app.update(key(KeyCode::Char('?')));
        assert!(app.help);
        app.update(key(KeyCode::Char('x')));
        assert!(!app.help);
        assert_eq!(app.update(key(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(
            app.update(Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL))),
            Action::Quit
        );
    }

    #[test]
    fn a_bad_filter_shows_an_error_and_keeps_the_old_one() {
        let mut app = fed(12);
        for c in "/icmp".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        app.update(key(KeyCode::Enter));
        assert_eq!(app.filter_text, "icmp");
        assert!(app.error.is_none());
        assert_eq!(app.packets, 0, "views restart under the new filter");
        app.update(key(KeyCode::Char('/')));
        for _ in 0..4 {
            app.update(key(KeyCode::Backspace));
        }
        for c in "port 99999".chars() {
            app.update(key(KeyCode::Char(c)));
        }
        app.update(key(KeyCode::Enter));
        assert_eq!(app.filter_text, "icmp", "old filter kept");
        assert!(
            app.error.as_deref().is_some_and(|e| e.contains("99999")),
            "{:?}",
            app.error
        );
        // Only ICMP counts now.
        app.update(Msg::Packets(
            fed(4).flows.values().flat_map(|f| f.recent.clone()).collect(),
        ));
        assert!(
            app.flows.keys().all(|k| k.proto == "icmp"),
            "{:?}",
            app.flows.keys().collect::<Vec<_>>()
        );
        // Esc cancels an edit.
        app.update(key(KeyCode::Char('/')));
        app.update(key(KeyCode::Char('x')));
        app.update(key(KeyCode::Esc));
        assert!(app.editing.is_none() && app.filter_text == "icmp");
    }

    #[test]
    fn ticks_turn_windows_into_rates_and_history() {
        let mut app = fed(12);
        app.update(Msg::Tick {
            secs: 2.0,
            kernel: KernelCounters {
                ring_lost: 3,
                ..Default::default()
            },
            expired: 1,
            costs: vec![],
            cpu_share: 0.5,
        });
        let i = STEPS.iter().position(|s| s.name == "lo transmit").expect("step");
        assert_eq!(app.steps[i].rate, 16.0);
        assert_eq!(app.steps[i].window, 0);
        assert_eq!(app.kernel.ring_lost, 3);
        assert!(app.softirq_now.is_empty() && !app.softirq_hist.is_empty());
    }
}
