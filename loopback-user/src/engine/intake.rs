//! Where ring-buffer records enter user space: decoded, recorded when asked, fed to the tracker.
use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};

use crate::{
    decode::Decoder,
    path::{PacketPath, Tracker},
    record,
};

/// Where ring-buffer records enter user space: the stateful decoder and the counts that let the
/// summary account for every record the kernel emitted.
#[derive(Default)]
pub struct Intake {
    pub decoder: Decoder,
    /// Events read from the ring buffer (a run record holds several).
    pub received: u64,
    /// Events whose record did not decode (counted, never dropped silently).
    pub undecodable: u64,
    /// `--write`: every record and expiry tick goes to the recording first.
    pub recorder: Option<record::Writer>,
    /// The packets one event finished, handed to the sink: one vector, reused.
    done: Vec<PacketPath>,
}

impl Intake {
    /// Expires idle packets at `now` (recorded, so that replay expires at the same point).
    pub fn expire(&mut self, tracker: &mut Tracker, now: u64) -> Result<Vec<PacketPath>> {
        if let Some(r) = &mut self.recorder {
            r.tick(now).context("writing the recording")?;
        }
        Ok(tracker.expire(now))
    }

    /// Decodes one record into the tracker, handing finished packets to `sink`.
    pub fn take(
        &mut self,
        bytes: &[u8],
        tracker: &mut Tracker,
        sink: &mut impl FnMut(&mut Vec<PacketPath>) -> Result<()>,
    ) -> Result<()> {
        if let Some(r) = &mut self.recorder {
            r.event(bytes).context("writing the recording")?;
        }
        let mut result = Ok(());
        let done = &mut self.done;
        match self.decoder.decode_each(bytes, |ev| {
            if result.is_ok() {
                tracker.push_into(ev, done);
                if !done.is_empty() {
                    result = sink(done);
                    done.clear();
                }
            }
        }) {
            Ok(events) => self.received += events,
            Err(_) => {
                // As many events as the record claims to hold (1 if it cannot tell).
                let events = crate::decode::record_events(bytes);
                self.received += events;
                self.undecodable += events;
            }
        }
        result
    }
}

/// Decodes and reconstructs everything currently in the ring buffer, handing finished packets
/// to `sink` (shared by `trace` and `prove`).
pub fn pump(
    rb: &mut RingBuf<MapData>,
    intake: &mut Intake,
    tracker: &mut Tracker,
    mut sink: impl FnMut(&mut Vec<PacketPath>) -> Result<()>,
) -> Result<()> {
    while let Some(item) = rb.next() {
        intake.take(&item, tracker, &mut sink)?;
    }
    Ok(())
}
