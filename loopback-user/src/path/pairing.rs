//! Pairing: echo replies with their requests, TCP ACKs with the segments they cover, clones
//! with their originals.
use std::{collections::VecDeque, net::IpAddr};

use rustc_hash::FxHashMap;

use super::{PacketPath, Tracker, Verdict};
use crate::decode::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PacketInfo};

/// Key of an ICMP echo: (id, seq, requester address).
pub(super) type EchoKey = (u16, u16, IpAddr);
/// One direction of a TCP flow.
pub(super) type FlowKey = (IpAddr, u16, IpAddr, u16);

pub fn is_echo_request(p: &PacketInfo) -> bool {
    matches!(
        (p.proto, p.icmp.map(|i| i.ty)),
        (PROTO_ICMP, Some(8)) | (PROTO_ICMPV6, Some(128))
    )
}
pub fn is_echo_reply(p: &PacketInfo) -> bool {
    matches!(
        (p.proto, p.icmp.map(|i| i.ty)),
        (PROTO_ICMP, Some(0)) | (PROTO_ICMPV6, Some(129))
    )
}

/// Two captures of the same packet bytes (original and clone).
fn same_headers(a: &PacketInfo, b: &PacketInfo) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.proto == b.proto
        && a.icmp == b.icmp
        && a.sport == b.sport
        && a.dport == b.dport
}

/// What pairing remembers: echo requests by key (oldest first, bounded) and, per TCP
/// direction, the segments not yet acknowledged. Apart from the paths in flight, so that a
/// path can be paired where it lies in the map.
#[derive(Default)]
pub(super) struct Pairing {
    echo_requests: FxHashMap<EchoKey, u64>,
    echo_order: VecDeque<EchoKey>,
    tcp_unacked: FxHashMap<FlowKey, VecDeque<(u32, u64)>>,
}

impl Tracker {
    pub(super) fn link_clone(&mut self, clone: &mut PacketPath, done: &mut Vec<PacketPath>) {
        let Some(ci) = clone.info.clone() else { return };
        let pos = self
            .awaiting_clone
            .iter()
            .position(|o| o.info.as_ref().is_some_and(|oi| same_headers(oi, &ci)));
        if let Some(pos) = pos
            && let Some(orig) = self.awaiting_clone.remove(pos)
        {
            clone.clone_of = Some(orig.id);
            clone.reply_of = orig.reply_of;
            self.finish(orig, Verdict::DeliveredClone, done);
            return;
        }
        // The original may still be in flight (clone read before the original was freed).
        if let Some(orig) = self
            .inflight
            .values()
            .filter(|o| !o.is_copy() && o.info.as_ref().is_some_and(|oi| same_headers(oi, &ci)))
            .max_by_key(|o| o.id)
        {
            clone.clone_of = Some(orig.id);
            clone.reply_of = orig.reply_of;
            // Bounded by the paths in flight: an original leaves the set when it is finished.
            self.clone_read.insert(orig.id);
        }
    }
}

impl Pairing {
    pub(super) fn pair(&mut self, p: &mut PacketPath) {
        let Some(info) = p.info.clone() else { return };
        if let Some(icmp) = info.icmp {
            if is_echo_request(&info) && p.clone_of.is_none() {
                let key = (icmp.id, icmp.seq, info.src);
                self.echo_requests.insert(key, p.id);
                self.echo_order.push_back(key);
                while self.echo_order.len() > 4096 {
                    if let Some(k) = self.echo_order.pop_front() {
                        self.echo_requests.remove(&k);
                    }
                }
            } else if is_echo_reply(&info) && p.reply_of.is_none() {
                p.reply_of = self.echo_requests.get(&(icmp.id, icmp.seq, info.dst)).copied();
            }
            return;
        }
        if info.proto != PROTO_TCP || p.clone_of.is_some() {
            return;
        }
        let (Some(tcp), Some(sport), Some(dport)) = (info.tcp, info.sport, info.dport) else {
            return;
        };
        // ACK: answers the newest segment of the reverse direction it fully covers.
        if tcp.flags & 0x10 != 0 {
            let rev = (info.dst, dport, info.src, sport);
            if let Some(q) = self.tcp_unacked.get_mut(&rev) {
                let mut answered = None;
                while let Some(&(end, id)) = q.front() {
                    if (tcp.ack.wrapping_sub(end) as i32) >= 0 {
                        answered = Some(id);
                        q.pop_front();
                    } else {
                        break;
                    }
                }
                p.reply_of = answered;
            }
        }
        let syn_fin = u32::from(tcp.flags & 0x03 != 0);
        let payload = info.l4_payload_len.unwrap_or(0);
        if payload + syn_fin > 0 {
            let fwd = (info.src, sport, info.dst, dport);
            if !self.tcp_unacked.contains_key(&fwd) && self.tcp_unacked.len() >= 4096 {
                self.tcp_unacked.clear();
            }
            let q = self.tcp_unacked.entry(fwd).or_default();
            q.push_back((tcp.seq.wrapping_add(payload + syn_fin), p.id));
            if q.len() > 1024 {
                q.pop_front();
            }
        }
    }
}
