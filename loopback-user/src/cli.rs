//! Command line (clap derive) and dispatch. Errors are one line; bad input exits 2.
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    bpf::doctor,
    filter,
    netns::Netns,
    trace::{self, Format, TraceConfig},
};

#[derive(Parser, Debug)]
#[command(
    name = "lotrace",
    version,
    about = "Trace packets through the Linux loopback path with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Report what this kernel allows (by trying) and the hook plan tracing will use.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Trace every packet of a network namespace through the kernel, one block per packet.
    Trace {
        /// Network namespace to trace: a name from `ip netns` or a path such as /proc/PID/ns/net
        /// (default: the namespace lotrace runs in).
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
        /// tcpdump-like filter, e.g. "icmp or (udp and port 53)".
        #[arg(long, value_name = "EXPR")]
        filter: Option<String>,
        /// Only packets sent or received by this process id.
        #[arg(long, value_name = "N")]
        pid: Option<u32>,
        /// Stop after printing N packets.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Stop after SECS seconds (fractions allowed).
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        duration: Option<Duration>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Also attach generic XDP on lo. Off by default: generic XDP makes the kernel copy every
        /// loopback packet into a new skb (and drop it if that copy fails); tc ingress sees the
        /// same bytes without that.
        #[arg(long)]
        xdp: bool,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v < 1e9) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// An error caused by the user's input: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

pub async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Doctor { json } => {
            let r = doctor::run()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", doctor::render_text(&r));
            }
            if let Err(e) = doctor::require_can_trace(&r) {
                eprintln!("lotrace: {e}");
                return Ok(1);
            }
            Ok(0)
        }
        Cmd::Trace {
            netns,
            filter: f,
            pid,
            count,
            duration,
            format,
            xdp,
        } => {
            let filter = f.as_deref().map(filter::parse).transpose().map_err(usage)?;
            let netns = match netns.as_deref() {
                Some(spec) => Netns::resolve(spec).map_err(usage)?,
                None => Netns::current()?,
            };
            trace::run(TraceConfig {
                netns,
                filter,
                pid,
                count,
                duration,
                format,
                xdp,
            })
            .await?;
            Ok(0)
        }
    }
}
