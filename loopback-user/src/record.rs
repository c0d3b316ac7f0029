//! Recordings (`lotrace trace --write FILE`, `lotrace replay FILE`): the raw ring-buffer records
//! of a live run, framed, behind a self-describing header, so that the same reconstruction can
//! run later, anywhere, without root.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0   magic "LOTRACE\0"                      8 bytes
//! 8   format version (u32)                   currently 2 (1: no run records; still read)
//! 12  header length H (u32)
//! 16  header: H bytes of JSON (see [`Header`])
//! then frames until the end of the file:
//!     kind (u32)  length L (u32)  L bytes
//!     kind 1: one ring-buffer record, exactly as the kernel wrote it
//!     kind 2: expiry tick: the u64 clock value live tracing expired idle packets at
//!     kind 3: trailer, JSON (see [`Trailer`]); written when tracing ends cleanly
//! ```
//!
//! Ticks make replay print exactly what the live run printed: idle packets are expired at the
//! same points of the event stream. The writer is a 64 KiB buffer flushed on every drain, so
//! memory stays bounded; a recording cut short (kill -9) is readable up to its last whole frame.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufWriter, Read, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::counters::{KernelCounters, ProgramCost};

pub const MAGIC: &[u8; 8] = b"LOTRACE\0";
pub const FORMAT_VERSION: u32 = 2;
pub const KIND_EVENT: u32 = 1;
pub const KIND_TICK: u32 = 2;
pub const KIND_TRAILER: u32 = 3;
/// Larger headers or frames are taken as corruption, not allocated.
const MAX_HEADER: u32 = 1 << 20;
const MAX_FRAME: u32 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HookInfo {
    pub program: String,
    pub kind: String,
    pub attached: bool,
    pub fallback_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub lotrace_version: String,
    /// `uname -r` of the machine that recorded.
    pub kernel_release: String,
    /// Size of one event record (`RawEvent`); the tc egress record may carry more bytes.
    pub record_size: u32,
    pub netns_label: String,
    pub netns_inode: u32,
    /// Whose namespace it is (a container's, a pod's, the node's), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::owner::Owner>,
    /// CLOCK_MONOTONIC (the events' clock) and CLOCK_REALTIME read together at the start:
    /// wall time of an event = realtime_ns + (ts_ns - monotonic_ns).
    pub monotonic_ns: u64,
    pub realtime_ns: u64,
    /// Packet bytes captured per packet on lo.
    pub snaplen: u32,
    /// When the kernel programs were switched on (CLOCK_MONOTONIC ns; 0 in recordings made
    /// before lotrace wrote it): replay tells packets caught part-way at the start by it.
    #[serde(default)]
    pub tracing_since_ns: u64,
    pub hooks: Vec<HookInfo>,
    /// Kernel drop reason names by number (they differ between kernels).
    pub drop_reasons: BTreeMap<u64, String>,
}

impl Header {
    pub fn wall_offset_ns(&self) -> i128 {
        self.realtime_ns as i128 - self.monotonic_ns as i128
    }
}

/// What only the end of a run knows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Trailer {
    pub kernel: KernelCounters,
    pub costs: Vec<ProgramCost>,
    pub costs_unavailable: Option<String>,
}

/// A malformed recording: what is wrong and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordingError {
    #[error("not a lotrace recording (no \"LOTRACE\" magic at byte 0)")]
    Magic,
    #[error("recording format version {0} is newer than this lotrace reads (up to {FORMAT_VERSION})")]
    Newer(u32),
    #[error("byte {offset}: {what}")]
    At { offset: u64, what: String },
    #[error("cannot read: {0}")]
    Io(String),
}

fn at(offset: u64, what: impl Into<String>) -> RecordingError {
    RecordingError::At {
        offset,
        what: what.into(),
    }
}

pub struct Writer {
    out: BufWriter<File>,
}

impl Writer {
    pub fn create(path: &Path, header: &Header) -> std::io::Result<Self> {
        let mut out = BufWriter::with_capacity(64 * 1024, File::create(path)?);
        let h = serde_json::to_vec(header).map_err(std::io::Error::other)?;
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&(h.len() as u32).to_le_bytes())?;
        out.write_all(&h)?;
        Ok(Self { out })
    }
    fn frame(&mut self, kind: u32, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&kind.to_le_bytes())?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(data)
    }
    pub fn event(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.frame(KIND_EVENT, bytes)
    }
    pub fn tick(&mut self, now: u64) -> std::io::Result<()> {
        self.frame(KIND_TICK, &now.to_le_bytes())
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
    pub fn finish(mut self, trailer: &Trailer) -> std::io::Result<()> {
        let t = serde_json::to_vec(trailer).map_err(std::io::Error::other)?;
        self.frame(KIND_TRAILER, &t)?;
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// One frame of a recording.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Event(Vec<u8>),
    Tick(u64),
    Trailer(Trailer),
}

/// One frame of a recording, borrowing the reader's buffer (no copy, no allocation per frame).
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    Event(&'a [u8]),
    Tick(u64),
    Trailer(Trailer),
}

pub struct Reader<R: BufRead> {
    r: R,
    offset: u64,
    pub header: Header,
    done: bool,
    /// A frame cut by the end of the input's buffer, read whole here (reused from frame to
    /// frame).
    buf: Vec<u8>,
    /// Bytes of the frame last handed out from the input's own buffer, consumed before the next.
    pending: usize,
}

/// Reads exactly `buf.len()` bytes; `Ok(n)` short of that only at the end of the input.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, RecordingError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RecordingError::Io(e.to_string())),
        }
    }
    Ok(n)
}

impl Reader<std::io::BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let f = File::open(path).map_err(|e| RecordingError::Io(e.to_string()))?;
        Reader::new(std::io::BufReader::with_capacity(256 * 1024, f))
    }
}

impl<R: BufRead> Reader<R> {
    pub fn new(mut r: R) -> Result<Self, RecordingError> {
        let mut pre = [0u8; 16];
        let n = fill(&mut r, &mut pre)?;
        if n < 8 || &pre[..8] != MAGIC {
            return Err(RecordingError::Magic);
        }
        if n < 16 {
            return Err(at(n as u64, "truncated file header"));
        }
        let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
        if version > FORMAT_VERSION {
            return Err(RecordingError::Newer(version));
        }
        if version == 0 {
            return Err(at(8, "format version 0 does not exist"));
        }
        let len = u32::from_le_bytes([pre[12], pre[13], pre[14], pre[15]]);
        if len > MAX_HEADER {
            return Err(at(12, format!("header length {len} is implausible")));
        }
        let mut h = vec![0u8; len as usize];
        let got = fill(&mut r, &mut h)?;
        if got < h.len() {
            return Err(at(16 + got as u64, format!("truncated header ({got} of {len} bytes)")));
        }
        let header: Header = serde_json::from_slice(&h).map_err(|e| at(16, format!("corrupt header: {e}")))?;
        if header.format_version != version {
            return Err(at(16, "header and file disagree on the format version"));
        }
        Ok(Self {
            r,
            offset: 16 + len as u64,
            header,
            done: false,
            buf: Vec::new(),
            pending: 0,
        })
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, owned; `None` at a clean end of file.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, RecordingError> {
        Ok(self.next_frame_ref()?.map(|f| match f {
            FrameRef::Event(b) => Frame::Event(b.to_vec()),
            FrameRef::Tick(t) => Frame::Tick(t),
            FrameRef::Trailer(t) => Frame::Trailer(t),
        }))
    }

    /// The next frame, borrowing the reader's buffer; `None` at a clean end of file. A frame
    /// that lies whole in the input's buffer (nearly all) is handed out where it lies, not
    /// copied; one cut by the buffer's end is read into a buffer of our own.
    pub fn next_frame_ref(&mut self) -> Result<Option<FrameRef<'_>>, RecordingError> {
        if self.done {
            return Ok(None);
        }
        self.r.consume(std::mem::take(&mut self.pending));
        let start = self.offset;
        let io = |e: std::io::Error| RecordingError::Io(e.to_string());
        let avail = self.r.fill_buf().map_err(io)?;
        let whole = match avail.first_chunk::<8>() {
            Some(fh) => Some(frame_header(fh, start)?).filter(|(_, len)| avail.len() >= 8 + *len as usize),
            None => None,
        };
        if let Some((kind, len)) = whole {
            // Again: the buffer as it is (nothing is read when it holds bytes).
            let data = self
                .r
                .fill_buf()
                .map_err(io)?
                .get(8..8 + len as usize)
                .ok_or_else(|| RecordingError::Io("the input's buffer shrank between two looks".into()))?;
            self.pending = 8 + len as usize;
            self.offset = start + 8 + len as u64;
            let frame = frame(kind, data, start, len)?;
            self.done = matches!(frame, FrameRef::Trailer(_));
            return Ok(Some(frame));
        }
        let mut fh = [0u8; 8];
        let n = fill(&mut self.r, &mut fh)?;
        if n == 0 {
            self.done = true;
            return Ok(None);
        }
        if n < 8 {
            return Err(at(start, format!("truncated frame header ({n} of 8 bytes)")));
        }
        let (kind, len) = frame_header(&fh, start)?;
        self.buf.resize(len as usize, 0);
        let data = self.buf.as_mut_slice();
        let got = fill(&mut self.r, data)?;
        if got < data.len() {
            return Err(at(start, format!("truncated frame ({got} of {len} bytes)")));
        }
        self.offset = start + 8 + len as u64;
        let frame = frame(kind, &self.buf, start, len)?;
        self.done = matches!(frame, FrameRef::Trailer(_));
        Ok(Some(frame))
    }
}

/// A frame header's kind and length, checked (`start`: the frame's offset, for errors).
fn frame_header(fh: &[u8; 8], start: u64) -> Result<(u32, u32), RecordingError> {
    let kind = u32::from_le_bytes([fh[0], fh[1], fh[2], fh[3]]);
    let len = u32::from_le_bytes([fh[4], fh[5], fh[6], fh[7]]);
    if !(KIND_EVENT..=KIND_TRAILER).contains(&kind) {
        return Err(at(start, format!("unknown frame kind {kind}")));
    }
    if len > MAX_FRAME {
        return Err(at(start + 4, format!("frame length {len} is implausible")));
    }
    Ok((kind, len))
}

/// A frame from its kind and bytes.
fn frame(kind: u32, data: &[u8], start: u64, len: u32) -> Result<FrameRef<'_>, RecordingError> {
    Ok(match kind {
        KIND_EVENT => FrameRef::Event(data),
        KIND_TICK => {
            let b: [u8; 8] = data
                .try_into()
                .map_err(|_| at(start + 4, format!("tick frame of {len} bytes, expected 8")))?;
            FrameRef::Tick(u64::from_le_bytes(b))
        }
        _ => {
            FrameRef::Trailer(serde_json::from_slice(data).map_err(|e| at(start + 8, format!("corrupt trailer: {e}")))?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn header() -> Header {
        Header {
            format_version: FORMAT_VERSION,
            lotrace_version: "test".into(),
            kernel_release: "6.x".into(),
            record_size: loopback_common::RAW_EVENT_SIZE as u32,
            netns_label: "t".into(),
            netns_inode: 1,
            owner: None,
            monotonic_ns: 10,
            realtime_ns: 20,
            snaplen: 96,
            tracing_since_ns: 0,
            hooks: vec![],
            drop_reasons: BTreeMap::from([(2, "NOT_SPECIFIED".to_string())]),
        }
    }

    fn sample() -> (Vec<u8>, Trailer) {
        // One file per call: the tests run in parallel in one process.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lotrace-rec-{}-{n}", std::process::id()));
        let trailer = Trailer {
            kernel: KernelCounters {
                ring_lost: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut w = Writer::create(&dir, &header()).expect("create");
        w.event(&[1, 2, 3]).expect("event");
        w.tick(99).expect("tick");
        w.event(&[4; 200]).expect("event");
        w.finish(&trailer).expect("finish");
        let bytes = std::fs::read(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        (bytes, trailer)
    }

    fn frames(bytes: &[u8]) -> Result<Vec<Frame>, RecordingError> {
        let mut r = Reader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_header_frames_and_trailer() {
        let (bytes, trailer) = sample();
        let r = Reader::new(bytes.as_slice()).expect("reader");
        assert_eq!(r.header, header());
        assert_eq!(
            frames(&bytes).expect("frames"),
            vec![
                Frame::Event(vec![1, 2, 3]),
                Frame::Tick(99),
                Frame::Event(vec![4; 200]),
                Frame::Trailer(trailer)
            ]
        );
    }

    #[test]
    fn every_truncation_is_an_error_with_its_offset_or_a_clean_prefix() {
        let (bytes, _) = sample();
        let hlen = u32::from_le_bytes(bytes[12..16].try_into().expect("4")) as usize;
        let body = 16 + hlen;
        for cut in 0..bytes.len() {
            match frames(&bytes[..cut]) {
                // Cut exactly between frames: a valid (shorter) recording without trailer.
                Ok(f) => assert!(cut >= body && !matches!(f.last(), Some(Frame::Trailer(_))), "cut {cut}"),
                Err(RecordingError::Magic) => assert!(cut < 8),
                Err(RecordingError::At { offset, .. }) => assert!(offset as usize <= cut, "cut {cut}"),
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
    }

    #[test]
    fn foreign_newer_and_corrupt_files_are_named() {
        assert_eq!(frames(b"GIF89a......").err(), Some(RecordingError::Magic));
        let (mut bytes, _) = sample();
        bytes[8] = 9;
        assert_eq!(frames(&bytes).err(), Some(RecordingError::Newer(9)));
        let (mut bytes, _) = sample();
        bytes[16] = b'!';
        assert!(matches!(frames(&bytes), Err(RecordingError::At { offset: 16, .. })));
        let (mut bytes, _) = sample();
        let hlen = u32::from_le_bytes(bytes[12..16].try_into().expect("4")) as usize;
        bytes[16 + hlen] = 7; // first frame's kind
        let e = frames(&bytes).expect_err("bad kind");
        assert_eq!(e.to_string(), format!("byte {}: unknown frame kind 7", 16 + hlen));
        bytes[16 + hlen] = 1;
        bytes[16 + hlen + 4..16 + hlen + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(frames(&bytes).expect_err("huge").to_string().contains("implausible"));
    }
}
