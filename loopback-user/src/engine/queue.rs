//! Printing apart from draining (`trace`): finished packets go to a printer thread through a
//! queue, so a slow reader of stdout never holds up the ring reader (which would make the
//! kernel lose events). The queue is bounded in packets; a batch that does not fit is not
//! printed and is counted (`unprinted` in the summary), never dropped silently.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, Sender, TryRecvError, channel},
    },
    thread::JoinHandle,
};

use anyhow::{Result, anyhow};

use super::{Printer, wanted};
use crate::{filter::Expr, path::PacketPath};

/// At most this many packets wait for the printer (about 2 KiB each in memory).
const MAX_QUEUED: u64 = 4096;

#[derive(Default)]
struct Shared {
    /// Packets sent and not yet taken by the printer.
    queued: AtomicU64,
    /// The printer is done: `--count` reached, or its output failed (the error is returned by
    /// [`PrintQueue::finish`]).
    done: AtomicBool,
}

pub struct PrintQueue {
    tx: Option<Sender<Vec<PacketPath>>>,
    thread: Option<JoinHandle<(Printer, Result<()>)>>,
    shared: Arc<Shared>,
    filter: Option<Expr>,
    pid: Option<u32>,
    partial: bool,
    /// Packets that passed the filter but did not fit in the queue.
    pub unprinted: u64,
}

impl PrintQueue {
    /// Moves `printer` to a thread of its own. Start it only once capabilities are dropped
    /// (they belong to threads, and dropping them checks that lotrace has one).
    pub fn start(printer: Printer) -> Result<Self> {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared::default());
        let (filter, pid, partial) = (printer.opts.filter.clone(), printer.opts.pid, printer.opts.partial);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lotrace-print".into())
            .spawn(move || print_loop(printer, &rx, &s))
            .map_err(|e| anyhow!("cannot start the printer thread: {e}"))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            shared,
            filter,
            pid,
            partial,
            unprinted: 0,
        })
    }

    /// Queues the packets the printer wants; those that do not fit are counted, not printed.
    pub fn send(&mut self, paths: &mut Vec<PacketPath>) {
        let mut paths = std::mem::take(paths);
        paths.retain(|p| wanted(p, self.filter.as_ref(), self.pid, self.partial));
        if paths.is_empty() || self.done() {
            return;
        }
        let n = paths.len() as u64;
        if self.shared.queued.load(Ordering::Relaxed) + n > MAX_QUEUED {
            self.unprinted += n;
            return;
        }
        self.shared.queued.fetch_add(n, Ordering::Relaxed);
        if let Some(tx) = &self.tx
            && tx.send(paths).is_err()
        {
            // The printer ended (its output failed): `finish` returns why.
            self.shared.done.store(true, Ordering::Relaxed);
        }
    }

    /// `--count` reached, or the output failed: time to stop.
    pub fn done(&self) -> bool {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// Lets the printer print what is queued, and takes it back.
    pub fn finish(mut self) -> Result<Printer> {
        drop(self.tx.take());
        let (printer, result) = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("printer already finished"))?
            .join()
            .map_err(|_| anyhow!("the printer thread panicked"))?;
        result.map(|()| printer)
    }
}

fn print_loop(mut printer: Printer, rx: &Receiver<Vec<PacketPath>>, s: &Shared) -> (Printer, Result<()>) {
    let result = (|| -> Result<()> {
        loop {
            let batch = match rx.try_recv() {
                Ok(b) => b,
                // Nothing waiting: what was printed goes out before the thread sleeps.
                Err(TryRecvError::Empty) => {
                    printer.flush()?;
                    match rx.recv() {
                        Ok(b) => b,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            s.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            // Filtered by `send` already.
            printer.print_wanted(&batch)?;
            if printer.done() {
                s.done.store(true, Ordering::Relaxed);
            }
        }
        printer.flush()
    })();
    if result.is_err() {
        s.done.store(true, Ordering::Relaxed);
    }
    (printer, result)
}
