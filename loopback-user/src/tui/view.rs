//! The dashboard's views: pure functions of [`App`] (snapshot-tested with TestBackend).
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Bar, BarChart, BarGroup, Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap},
};

use super::app::{App, Panel};
use crate::hooks::STEPS;
use crate::{
    output::{TextStyle, fmt_ns},
    path::PacketPath,
};

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

/// A count that must catch the eye when it is not zero.
fn alarm(label: &str, n: u64) -> Span<'static> {
    let style = if n > 0 {
        Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::default().fg(Color::Green)
    };
    Span::styled(format!("{label} {n}"), style)
}

fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.0}k/s", r / 1000.0)
    } else if r >= 1000.0 {
        format!("{:.1}k/s", r / 1000.0)
    } else {
        format!("{r:.0}/s")
    }
}

fn panel(title: &str, focused: bool) -> Block<'static> {
    let b = Block::default().borders(Borders::ALL).title(title.to_string());
    if focused {
        b.border_style(Style::default().fg(Color::Cyan))
    } else {
        b
    }
}

pub fn view(app: &App, f: &mut Frame) {
    let area = f.area();
    let flows_h = ((area.height.saturating_sub(3)) / 3).max(7);
    let [title, status, middle, flows, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(12),
        Constraint::Length(flows_h),
        Constraint::Length(1),
    ])
    .areas(area);
    title_line(app, f, title);
    status_line(app, f, status);
    let right_w = if area.width >= 110 { 40 } else { 28 };
    let [path, side] = Layout::horizontal([Constraint::Min(50), Constraint::Length(right_w)]).areas(middle);
    path_view(app, f, path);
    side_view(app, f, side);
    flows_view(app, f, flows);
    footer_line(app, f, footer);
    if app.inspector.is_some() {
        inspector_view(app, f, popup(area, 94, 90));
    }
    if app.help {
        help_view(f, popup(area, 70, 80));
    }
}

fn popup(area: Rect, pct_w: u16, pct_h: u16) -> Rect {
    let w = area.width * pct_w / 100;
    let h = area.height * pct_h / 100;
    Rect::new(area.x + (area.width - w) / 2, area.y + (area.height - h) / 2, w, h)
}

fn title_line(app: &App, f: &mut Frame, r: Rect) {
    let mut spans = vec![
        Span::styled(" lotrace ", bold().fg(Color::Black).bg(Color::Cyan)),
        Span::raw(format!(" {}  {} packets", app.source, app.packets)),
    ];
    if !app.filter_text.is_empty() {
        spans.push(Span::styled(
            format!("  filter: {}", app.filter_text),
            Style::default().fg(Color::Yellow),
        ));
    }
    if app.paused {
        spans.push(Span::styled(
            format!("  PAUSED ({} not shown)", app.skipped),
            bold().fg(Color::Yellow),
        ));
    }
    if app.ended {
        spans.push(Span::styled("  end of recording", bold()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), r);
}

fn status_line(app: &App, f: &mut Frame, r: Rect) {
    let drops: u64 = app.drops.values().sum();
    let mut spans = vec![
        alarm("drops", drops),
        Span::raw(" | "),
        alarm("lost events", app.kernel.ring_lost + app.kernel.scope_full),
        Span::raw(" | "),
        alarm("expired", app.expired),
    ];
    if app.partial > 0 {
        spans.push(Span::raw(format!(" | cut by start/stop: {}", app.partial)));
    }
    if !app.drops.is_empty() {
        let list: Vec<String> = app.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        spans.push(Span::styled(
            format!(" ({})", list.join(", ")),
            Style::default().fg(Color::Red),
        ));
    }
    if !app.missing.is_empty() {
        spans.push(Span::raw(" | "));
        spans.push(Span::styled(
            format!("not attached: {}", app.missing.join(", ")),
            Style::default().fg(Color::Yellow),
        ));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), r);
}

fn path_view(app: &App, f: &mut Frame, r: Rect) {
    let focused = app.focus == Panel::Path;
    let rows = STEPS.iter().enumerate().map(|(i, s)| {
        let st = &app.steps[i];
        let selected = focused && i == app.path_row;
        let row = if !app.observable(s) {
            Row::new(vec![
                Cell::from(format!("{} {}", if i == 0 { " " } else { "↓" }, s.name)),
                Cell::from("unseen*"),
                Cell::from("-"),
                Cell::from("-"),
                Cell::from(s.why_not),
            ])
            .style(dim())
        } else {
            let (p50, p99) = match &st.latency {
                Some(h) if i > 0 => (fmt_ns(h.value_at_quantile(0.5)), fmt_ns(h.value_at_quantile(0.99))),
                _ => ("-".into(), "-".into()),
            };
            Row::new(vec![
                Cell::from(format!("{} {}", if i == 0 { " " } else { "↓" }, s.name)),
                Cell::from(rate(st.rate)),
                Cell::from(p50),
                Cell::from(p99),
                Cell::from(s.stages.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")),
            ])
        };
        if selected {
            row.style(Style::default().add_modifier(Modifier::REVERSED))
        } else {
            row
        }
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(19),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Min(0),
        ],
    )
    .header(Row::new(vec!["step", "pkts/s", "p50", "p99", "hooks"]).style(bold()))
    .block(panel("loopback path (latency from the previous step)", focused));
    f.render_widget(t, r);
    // Legend on the panel's last inner line, when there is room for it.
    let legend_y = r.y + 2 + STEPS.len() as u16;
    // Below it, when there is room: the latency distribution of the selected step (the first
    // step with packets when the panel is not focused).
    let chart_y = legend_y + 1;
    let bottom = r.y + r.height.saturating_sub(1);
    if bottom > chart_y + 4 {
        latency_chart(
            app,
            f,
            Rect::new(r.x + 1, chart_y, r.width.saturating_sub(2), bottom - chart_y),
        );
    }
    if legend_y < r.y + r.height.saturating_sub(1) {
        let why = STEPS
            .iter()
            .filter(|s| !app.observable(s))
            .map(|s| format!("{}: {}", s.name, s.why_not))
            .collect::<Vec<_>>()
            .join("; ");
        f.render_widget(
            Paragraph::new(Line::styled(format!("* not observable on this kernel ({why})"), dim())),
            Rect::new(r.x + 1, legend_y, r.width.saturating_sub(2), 1),
        );
    }
}

/// Log2 buckets of a latency histogram from 64 ns up: (lower bound, count), without the empty
/// buckets before the first and after the last one in use.
pub fn log2_buckets(h: &hdrhistogram::Histogram<u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = (6..=30)
        .map(|k| {
            let lo = if k == 6 { 0 } else { 1u64 << k };
            let hi = (1u64 << (k + 1)) - 1;
            (1u64 << k, h.count_between(lo, hi))
        })
        .collect();
    while v.last().is_some_and(|b| b.1 == 0) {
        v.pop();
    }
    let first = v.iter().position(|b| b.1 > 0).unwrap_or(v.len());
    v.drain(..first);
    v
}

/// The selected step's latency (from the previous step) as a histogram of log2 buckets: how it
/// spreads, where p50/p99 are two numbers.
fn latency_chart(app: &App, f: &mut Frame, r: Rect) {
    let pick = if app.focus == Panel::Path {
        Some(app.path_row)
    } else {
        (1..STEPS.len()).find(|&i| app.steps[i].latency.as_ref().is_some_and(|h| !h.is_empty()))
    };
    let Some((i, h)) = pick
        .filter(|&i| i > 0)
        .and_then(|i| Some((i, app.steps.get(i)?.latency.as_ref()?)))
    else {
        return;
    };
    let bars: Vec<Bar> = log2_buckets(h)
        .into_iter()
        .map(|(lo, n)| Bar::default().value(n).label(Line::from(format!("≥{}", fmt_ns(lo)))))
        .collect();
    let chart = BarChart::default()
        .block(Block::default().title(Span::styled(
            format!("{} latency, packets per log2 bucket", STEPS[i].name),
            bold(),
        )))
        .data(BarGroup::default().bars(&bars))
        .bar_width(6)
        .bar_gap(1);
    f.render_widget(chart, r);
}

fn side_view(app: &App, f: &mut Frame, r: Rect) {
    let cpus = app
        .softirq_hist
        .keys()
        .chain(app.softirq_now.keys())
        .collect::<std::collections::BTreeSet<_>>();
    let cost_lines = 2 + app.costs.len().min(3) as u16;
    let [soft, cost] = Layout::vertical([Constraint::Min(4), Constraint::Length(cost_lines + 2)]).areas(r);
    let block = panel("NET_RX softirq context", false);
    let inner = block.inner(soft);
    f.render_widget(block, soft);
    f.render_widget(
        Paragraph::new(Line::styled("% inline/ksoftirqd/other", dim())),
        Rect::new(inner.x, inner.y, inner.width, 1),
    );
    let mut y = inner.y + 1;
    for cpu in cpus {
        if y + 1 >= inner.y + inner.height {
            break;
        }
        let hist: Vec<[u64; 3]> = app
            .softirq_hist
            .get(cpu)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default();
        let total: [u64; 3] = hist
            .iter()
            .chain(app.softirq_now.get(cpu))
            .fold([0; 3], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2]]);
        let sum = (total[0] + total[1] + total[2]).max(1);
        let pct = |n: u64| n * 100 / sum;
        let line = Line::from(vec![
            Span::styled(format!("cpu{cpu}  "), bold()),
            Span::styled(format!("{}", pct(total[0])), Style::default().fg(Color::Green)),
            Span::raw("/"),
            Span::styled(format!("{}", pct(total[1])), Style::default().fg(Color::Magenta)),
            Span::raw(format!("/{}", pct(total[2]))),
            Span::styled(format!("  {} runs", total.iter().sum::<u64>()), dim()),
        ]);
        f.render_widget(Paragraph::new(line), Rect::new(inner.x, y, inner.width, 1));
        // ksoftirqd share per interval, over time (0..100).
        let data: Vec<u64> = hist.iter().map(|c| c[1] * 100 / (c[0] + c[1] + c[2]).max(1)).collect();
        f.render_widget(
            Sparkline::default()
                .data(&data)
                .max(100)
                .style(Style::default().fg(Color::Magenta)),
            Rect::new(inner.x, y + 1, inner.width, 1),
        );
        y += 2;
    }
    let mut lines = vec![Line::from(format!("lotrace CPU {:.1}%", app.cpu_share * 100.0))];
    if app.costs.is_empty() {
        lines.push(Line::styled("kernel: no BPF stats", dim()));
    } else {
        let runs: u64 = app.costs.iter().map(|c| c.runs).sum();
        let ns: u64 = app.costs.iter().map(|c| c.total_ns).sum();
        lines.push(Line::from(format!(
            "kernel {} runs {}/run",
            runs,
            fmt_ns(ns.checked_div(runs).unwrap_or(0))
        )));
        let mut top = app.costs.clone();
        top.sort_by_key(|c| std::cmp::Reverse(c.total_ns));
        for c in top.iter().take(3) {
            lines.push(Line::from(format!(
                " {} {}/run",
                c.program,
                fmt_ns(c.total_ns.checked_div(c.runs).unwrap_or(0))
            )));
        }
    }
    f.render_widget(Paragraph::new(lines).block(panel("tracer cost", false)), cost);
}

fn flows_view(app: &App, f: &mut Frame, r: Rect) {
    let focused = app.focus == Panel::Flows;
    let rows = app.flow_rows();
    let visible = r.height.saturating_sub(3) as usize;
    let first = app.flow_row.saturating_sub(visible.saturating_sub(1));
    let body = rows.iter().enumerate().skip(first).take(visible).map(|(i, (k, fl))| {
        let row = Row::new(vec![
            Cell::from(k.proto.clone()),
            Cell::from(format!("{} -> {}", k.src, k.dst)),
            Cell::from(fl.packets.to_string()),
            Cell::from(fl.bytes.to_string()),
            Cell::from(fmt_ns(fl.latency.value_at_quantile(0.99))),
        ]);
        if focused && i == app.flow_row {
            row.style(Style::default().add_modifier(Modifier::REVERSED))
        } else {
            row
        }
    });
    let t = Table::new(
        body,
        [
            Constraint::Length(5),
            Constraint::Min(30),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(vec!["proto", "src -> dst", "packets", "bytes", "p99 e2e"]).style(bold()))
    .block(panel(
        &format!(
            "top flows ({}, sorted by {}; Enter: inspect)",
            rows.len(),
            app.sort.label()
        ),
        focused,
    ));
    f.render_widget(t, r);
}

fn footer_line(app: &App, f: &mut Frame, r: Rect) {
    let line = if let Some(text) = &app.editing {
        Line::from(vec![
            Span::styled("filter: ", bold().fg(Color::Yellow)),
            Span::raw(format!("{text}_")),
            Span::styled("  (Enter apply, Esc cancel)", dim()),
        ])
    } else if let Some(e) = &app.error {
        Line::styled(e.clone(), Style::default().fg(Color::Red).add_modifier(Modifier::BOLD))
    } else {
        Line::styled(
            "q quit  p pause  / filter  Tab panel  ↑↓ move  s sort  Enter inspect  ? help",
            dim(),
        )
    };
    f.render_widget(Paragraph::new(line), r);
}

fn find_reply<'a>(app: &'a App, p: &PacketPath) -> Option<&'a PacketPath> {
    app.flows
        .values()
        .flat_map(|f| f.recent.iter())
        .find(|q| q.reply_of == Some(p.id) || p.reply_of == Some(q.id))
}

fn inspector_view(app: &App, f: &mut Frame, r: Rect) {
    let Some(ins) = &app.inspector else { return };
    let flow = app.flows.get(&ins.flow);
    let n = flow.map(|f| f.recent.len()).unwrap_or(0);
    let p = flow.and_then(|fl| fl.recent.get(ins.index));
    f.render_widget(Clear, r);
    let title = format!(
        "{} {} -> {}   packet {}/{} (←/→ step, Esc close)",
        ins.flow.proto,
        ins.flow.src,
        ins.flow.dst,
        ins.index + 1,
        n
    );
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .border_style(Style::default().fg(Color::Cyan));
    let inner = block.inner(r);
    f.render_widget(block, r);
    let Some(p) = p else {
        f.render_widget(Paragraph::new("no packet (the flow left the table)"), inner);
        return;
    };
    let style = TextStyle {
        color: false,
        wall_offset_ns: 0,
    };
    let head = crate::output::packet_text(p, &style);
    let head = head.lines().next().unwrap_or("").to_string();
    // Drop the (monotonic) clock column: times here are deltas.
    let head = head.split_once(' ').map(|(_, rest)| rest.to_string()).unwrap_or(head);
    let reply = match find_reply(app, p) {
        Some(q) if q.reply_of == Some(p.id) => format!(
            "reply: #{} {} total {}",
            q.id,
            q.verdict.as_str(),
            fmt_ns(q.last_ts().saturating_sub(q.first_ts()))
        ),
        Some(q) => format!("answers: #{} {}", q.id, q.verdict.as_str()),
        None => "reply: none seen (yet)".into(),
    };
    let [h, rep, table] =
        Layout::vertical([Constraint::Length(2), Constraint::Length(1), Constraint::Min(1)]).areas(inner);
    f.render_widget(Paragraph::new(head).wrap(Wrap { trim: true }), h);
    f.render_widget(Paragraph::new(Line::styled(reply, bold())), rep);
    let rows = p.timed_stages().map(|(s, d)| {
        Row::new(vec![
            Cell::from(s.stage.as_str()),
            Cell::from(format!("+{}", fmt_ns(d))),
            Cell::from(format!("cpu{}", s.cpu)),
            Cell::from(format!("{}/{}", s.comm, s.tid)),
            Cell::from(s.dev.map(|d| d.to_string()).unwrap_or_default()),
        ])
    });
    let t = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(10),
            Constraint::Length(5),
            Constraint::Length(18),
            Constraint::Min(4),
        ],
    )
    .header(Row::new(vec!["stage", "delta", "cpu", "task", "dev"]).style(bold()));
    f.render_widget(t, table);
}

fn help_view(f: &mut Frame, r: Rect) {
    f.render_widget(Clear, r);
    let lines = vec![
        Line::styled("keys", bold()),
        Line::from("q, Ctrl-C   quit (the terminal is restored)"),
        Line::from("p           pause / resume the views (tracing goes on)"),
        Line::from("/           edit the filter (same language as trace)"),
        Line::from("Tab         switch panel (path, flows)"),
        Line::from("↑ ↓         move in the panel"),
        Line::from("s           sort flows: packets, bytes, p99"),
        Line::from("Enter       inspect the selected flow's packets"),
        Line::from("← →         step through packets in the inspector"),
        Line::from(""),
        Line::styled("what is shown", bold()),
        Line::from("path: packets/s and latency from the previous step"),
        Line::from("softirq: share of inline / ksoftirqd / other runs"),
        Line::from("per CPU; the line charts the ksoftirqd share"),
        Line::from("drops, lost events, expired: red when not zero"),
        Line::from("any key closes this help"),
    ];
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title("help")),
        r,
    );
}
