//! `--pcapng OUT`: the packets seen on `lo`, as pcapng (pcap-file crate), each with a comment
//! holding its reconstructed kernel path, so Wireshark shows the path on every packet.
use std::{borrow::Cow, fs::File, io::BufWriter, path::Path, time::Duration};

use anyhow::{Context, Result};
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

use crate::{
    output::{TextStyle, packet_text},
    path::PacketPath,
};

pub struct PcapOut {
    w: PcapNgWriter<BufWriter<File>>,
    snaplen: usize,
    style: TextStyle,
    /// Packets written.
    pub written: u64,
    /// Packets not written because no `lo` program captured their bytes (e.g. they never
    /// crossed `lo`, or the tc event was lost).
    pub without_bytes: u64,
}

impl PcapOut {
    /// `wall_offset_ns`: CLOCK_REALTIME - CLOCK_MONOTONIC of the run (live or recorded).
    pub fn create(path: &Path, snaplen: u32, wall_offset_ns: i128) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = PcapNgWriter::new(BufWriter::new(f)).context("pcapng section header")?;
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("lo")),
                // Timestamps are written in nanoseconds: say so, or readers assume microseconds.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        w.write_pcapng_block(idb).context("pcapng interface block")?;
        Ok(Self {
            w,
            snaplen: snaplen as usize,
            style: TextStyle {
                color: false,
                wall_offset_ns,
            },
            written: 0,
            without_bytes: 0,
        })
    }

    pub fn packet(&mut self, p: &PacketPath) -> Result<()> {
        let Some(wire) = &p.wire else {
            self.without_bytes += 1;
            return Ok(());
        };
        let wall = (wire.ts_ns as i128 + self.style.wall_offset_ns).max(0) as u128;
        let comment = format!("lotrace {}", packet_text(p, &self.style).trim_end());
        let epb = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::new((wall / 1_000_000_000) as u64, (wall % 1_000_000_000) as u32),
            original_len: wire.orig_len,
            data: Cow::Borrowed(&wire.bytes[..wire.bytes.len().min(self.snaplen)]),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
        };
        self.w.write_pcapng_block(epb).context("pcapng write")?;
        self.written += 1;
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        use std::io::Write;
        let mut inner = self.w.into_inner();
        inner.flush().context("pcapng flush")?;
        Ok(())
    }
}
