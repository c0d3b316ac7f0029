//! What a run prints: finished packets that pass the filter, as text or JSON lines, to stdout
//! (and the pcapng file), then the exit summary.
use std::io::{IsTerminal, Write};

use anyhow::Result;

use super::Intake;
use crate::{
    filter::Expr,
    output::{JsonLines, Summary, TextStyle, packet_text, summary_json, summary_text},
    path::{PacketPath, Stats},
    pcap::PcapOut,
    record,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What to print (shared by `trace` and `replay`).
pub struct PrintOpts {
    pub filter: Option<Expr>,
    pub pid: Option<u32>,
    pub count: Option<u64>,
    pub format: Format,
    /// `--partial`: print packets cut by the start or end of tracing too.
    pub partial: bool,
}

pub fn wanted(p: &PacketPath, filter: Option<&Expr>, pid: Option<u32>, partial: bool) -> bool {
    if !partial && p.partial() {
        return false;
    }
    if filter.is_some_and(|f| !f.passes(p)) {
        return false;
    }
    if let Some(pid) = pid
        && !p.stages.iter().any(|s| s.pid == pid)
    {
        return false;
    }
    true
}

/// JSON lines go to stdout once this many bytes of them are waiting (and whenever the printer
/// runs out of packets to print).
const LINES_AT_ONCE: usize = 64 * 1024;

/// Prints finished packets that pass the filter and `--pid`, up to `--count` (and writes them
/// to the pcapng file when there is one).
pub struct Printer {
    pub(super) opts: PrintOpts,
    style: TextStyle,
    out: std::io::BufWriter<std::io::Stdout>,
    /// JSON lines not yet written to `out` (which passes a write this large straight on).
    lines: JsonLines,
    pub printed: u64,
    pub pcap: Option<PcapOut>,
}

impl Printer {
    pub fn new(opts: PrintOpts, wall_offset_ns: i128, pcap: Option<PcapOut>) -> Self {
        let stdout = std::io::stdout();
        let color = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            opts,
            style: TextStyle { color, wall_offset_ns },
            out: std::io::BufWriter::new(stdout),
            lines: JsonLines::default(),
            printed: 0,
            pcap,
        }
    }

    pub fn done(&self) -> bool {
        self.opts.count.is_some_and(|c| self.printed >= c)
    }

    /// Prints the packets that pass the filter and `--pid`, up to `--count`.
    pub fn print_all(&mut self, paths: &[PacketPath]) -> Result<()> {
        for p in paths {
            if self.done() {
                break;
            }
            if wanted(p, self.opts.filter.as_ref(), self.opts.pid, self.opts.partial) {
                self.print(p)?;
            }
        }
        Ok(())
    }

    /// Prints packets already filtered (the print queue filters before queueing), up to
    /// `--count`.
    pub(super) fn print_wanted(&mut self, paths: &[PacketPath]) -> Result<()> {
        for p in paths {
            if self.done() {
                break;
            }
            self.print(p)?;
        }
        Ok(())
    }

    /// One packet to stdout and the pcapng file.
    fn print(&mut self, p: &PacketPath) -> Result<()> {
        match self.opts.format {
            Format::Json => {
                self.lines.push(p);
                if self.lines.len() >= LINES_AT_ONCE {
                    self.write_lines()?;
                }
            }
            Format::Text => write!(self.out, "{}", packet_text(p, &self.style))?,
        }
        if let Some(pc) = &mut self.pcap {
            pc.packet(p)?;
        }
        self.printed += 1;
        Ok(())
    }

    fn write_lines(&mut self) -> Result<()> {
        if !self.lines.is_empty() {
            self.out.write_all(self.lines.as_bytes())?;
            self.lines.clear();
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.write_lines()?;
        self.out.flush()?;
        Ok(())
    }

    /// Prints the exit summary (stderr) and closes the pcapng file.
    pub fn finish(mut self, stats: &Stats, summary: &Summary) -> Result<()> {
        self.flush()?;
        // Not eprintln!, which panics when stderr is gone: the summary is then just not shown.
        let text = match self.opts.format {
            Format::Json => format!("{}\n", summary_json(stats, summary)),
            Format::Text => summary_text(stats, summary),
        };
        let _ = std::io::stderr().write_all(text.as_bytes());
        if let Some(pc) = self.pcap.take() {
            eprintln!(
                "lotrace: pcapng: {} packet(s) written{}",
                pc.written,
                if pc.without_bytes > 0 {
                    format!(", {} without bytes captured on lo (not written)", pc.without_bytes)
                } else {
                    String::new()
                }
            );
            pc.finish()?;
        }
        Ok(())
    }
}

/// The intake (keeping packet bytes when there is a pcapng file or the filter tests bytes) and the printer of a run, live
/// or replayed, with the clock reference and snaplen of its header.
/// A filter that tests bytes past what each packet's capture holds is a usage error.
pub fn outputs(print: PrintOpts, pcapng: Option<&std::path::Path>, h: &record::Header) -> Result<(Intake, Printer)> {
    let bytes_filter = print.filter.as_ref().is_some_and(Expr::reads_bytes);
    if let Some(f) = &print.filter {
        f.check_capture(h.snaplen as usize).map_err(crate::usage::usage)?;
    }
    let mut intake = Intake::default();
    intake.decoder.keep_wire = pcapng.is_some() || bytes_filter;
    intake.decoder.wire_cap = Some(h.snaplen as usize);
    let pcap = pcapng
        .map(|p| PcapOut::create(p, h.snaplen, h.wall_offset_ns()))
        .transpose()?;
    Ok((intake, Printer::new(print, h.wall_offset_ns(), pcap)))
}

/// The exit summary: what was printed and read here, what the kernel counted (trailer).
pub fn summary(printer: &Printer, intake: &Intake, t: record::Trailer) -> Summary {
    Summary {
        printed: printer.printed,
        unprinted: 0,
        kernel: t.kernel,
        undecodable: intake.undecodable,
        received: intake.received,
        unnamed: intake.decoder.unnamed,
        costs: t.costs,
        costs_unavailable: t.costs_unavailable,
        netns: None,
    }
}
