//! Segment coalescing for the TUN device `weft-wg` writes decrypted packets into: a userspace
//! GRO, as the kernel does for a network card.
//!
//! Why: each packet written to a TUN device crosses the node's whole receive path on its own:
//! prerouting and forward hooks (weft's tables, kube-proxy's, conntrack), the pod's veth and the
//! pod's IP stack. A run of consecutive TCP segments of one flow written as one packet with a
//! virtio-net header (`IFF_VNET_HDR`, GSO type TCPv4/TCPv6) crosses it once; the kernel cuts it
//! back into the segments only if it must (a device without TSO on the way out), with the
//! headers they arrived with.
//!
//! What is merged, and only when all of it holds (anything else is written as it came, alone,
//! behind an empty header, so the kernel checks it exactly as it did before):
//! - IPv4 without options or fragmentation and with a right header checksum, or IPv6 whose
//!   next header is TCP;
//! - TCP segments with payload, a right checksum (verified here: the checksum of a merged
//!   packet is written by the kernel only if the packet leaves again, so a corrupt segment must
//!   not hide inside one), flags ACK, PSH allowed on the last segment of a run;
//! - consecutive in the batch, with the same addresses, ports, TOS or traffic class and flow
//!   label, TTL or hop limit, IPv4 DF, ack number, window and TCP options (byte for byte); the
//!   IPv4 ID one more than the previous one; each sequence number where the previous payload
//!   ended; every payload as long as the first but the last, which may be shorter (the run
//!   ends there);
//! - at most [`MAX_SEGMENTS`] segments and 64 KiB of IP packet.
//!
//! Pure: bytes in, frames (header + packet) out. The TUN side is in `tun_offload`.

/// Length of the virtio-net header in front of each packet on a TUN device opened with
/// `IFF_VNET_HDR` (the kernel's default header size).
pub const VNET_HDR_LEN: usize = 10;
/// Most segments merged into one packet.
pub const MAX_SEGMENTS: usize = 64;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is to be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const PROTO_TCP: u8 = 6;
const MAX_IP_LEN: usize = 65_535;

/// The virtio-net header (`struct virtio_net_hdr`), in the host's byte order (the legacy
/// format a TUN device uses unless told otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` or 0 (`VIRTIO_NET_HDR_F_DATA_VALID` may come with packets read).
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, …
    pub gso_type: u8,
    /// Length of the headers (IP + TCP) of a GSO packet.
    pub hdr_len: u16,
    /// Payload length of each segment of a GSO packet.
    pub gso_size: u16,
    /// Where the checksummed part starts (the TCP header).
    pub csum_start: u16,
    /// Where its checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// Adds `data` (big-endian 16-bit words, a last odd byte padded with zero) to a ones'
/// complement sum.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a ones' complement sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP/UDP pseudo-header sum of the IP packet `pkt` (v4 or v6) for a transport segment of
/// `len` bytes and protocol `proto`.
fn pseudo_sum(pkt: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    sum(addrs, u64::from(proto) + len as u64)
}

/// Completes the checksum of a packet read with [`F_NEEDS_CSUM`] (the kernel left it to the
/// device). False if the header points outside the packet.
pub fn complete_checksum(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > pkt.len() || start > pkt.len() {
        return false;
    }
    // The field holds the folded pseudo-header sum already; the rest is summed over it.
    let c = !fold(sum(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// What merging needs to know of a TCP segment that may be merged.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    ip_len: usize,
    tcp_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    ip_id: u16,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// `pkt` as a TCP segment that may be merged, or None (then it is written alone).
fn segment(pkt: &[u8]) -> Option<Segment> {
    let (v6, ip_len, ip_id) = match pkt.first()? >> 4 {
        4 => {
            if pkt.len() < 20
                || pkt[0] & 0x0f != 5
                || usize::from(be16(pkt, 2)) != pkt.len()
                || be16(pkt, 6) & 0x3fff != 0
                || pkt[9] != PROTO_TCP
                || fold(sum(&pkt[..20], 0)) != 0xffff
            {
                return None;
            }
            (false, 20, be16(pkt, 4))
        }
        6 => {
            if pkt.len() < 40 || pkt[6] != PROTO_TCP || usize::from(be16(pkt, 4)) + 40 != pkt.len()
            {
                return None;
            }
            (true, 40, 0)
        }
        _ => return None,
    };
    let tcp = pkt.get(ip_len..)?;
    if tcp.len() < 20 {
        return None;
    }
    let tcp_len = usize::from(tcp[12] >> 4) * 4;
    if tcp_len < 20 || tcp_len >= tcp.len() {
        return None;
    }
    let flags = tcp[13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    if fold(sum(tcp, pseudo_sum(pkt, v6, PROTO_TCP, tcp.len()))) != 0xffff {
        return None;
    }
    Some(Segment {
        v6,
        ip_len,
        tcp_len,
        payload: tcp.len() - tcp_len,
        seq: be32(tcp, 4),
        flags,
        ip_id,
    })
}

/// The run of segments being merged: its frame is the last one in `Gro::out`.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Where the frame (virtio-net header, then the packet) starts in `out`.
    start: usize,
    first: Segment,
    segments: usize,
    next_seq: u32,
    next_id: u16,
    /// The last segment was short or had PSH: nothing more may follow.
    closed: bool,
    psh: bool,
}

/// Counters since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroStats {
    /// Packets given to [`Gro::push`].
    pub packets: u64,
    /// Frames produced (each one write to the TUN device).
    pub frames: u64,
    /// Packets that went into a frame of two segments or more.
    pub merged: u64,
}

/// Merges a batch of packets into frames for a TUN device opened with `IFF_VNET_HDR`.
/// [`Gro::push`] each packet of a batch in order, then [`Gro::finish`] and write every frame it
/// returns, in order; then [`Gro::clear`].
#[derive(Debug, Default)]
pub struct Gro {
    out: Vec<u8>,
    frames: Vec<(usize, usize)>,
    run: Option<Run>,
    /// Write every packet alone (for comparisons: `weft-wg run --merge off`).
    off: bool,
    /// Counters.
    pub stats: GroStats,
}

impl Gro {
    /// A merger; with `merge` false it writes every packet alone.
    pub fn new(merge: bool) -> Gro {
        Gro {
            off: !merge,
            ..Gro::default()
        }
    }

    /// Adds the next packet of the batch.
    pub fn push(&mut self, pkt: &[u8]) {
        self.stats.packets += 1;
        let seg = if self.off { None } else { segment(pkt) };
        let Some(seg) = seg else {
            self.close();
            self.alone(pkt);
            return;
        };
        if let Some(run) = self.run
            && self.extends(&run, pkt, &seg)
        {
            self.out.extend_from_slice(&pkt[seg.ip_len + seg.tcp_len..]);
            let run = self.run.as_mut().expect("a run is open");
            run.segments += 1;
            run.next_seq = seg.seq.wrapping_add(seg.payload as u32);
            run.next_id = seg.ip_id.wrapping_add(1);
            run.psh = seg.flags & TCP_PSH != 0;
            run.closed = run.psh || seg.payload < run.first.payload;
            return;
        }
        self.close();
        let start = self.out.len();
        self.out.extend_from_slice(&[0; VNET_HDR_LEN]);
        self.out.extend_from_slice(pkt);
        self.run = Some(Run {
            start,
            first: seg,
            segments: 1,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            next_id: seg.ip_id.wrapping_add(1),
            closed: seg.flags != TCP_ACK,
            psh: seg.flags & TCP_PSH != 0,
        });
    }

    /// Whether `pkt` (parsed as `seg`) continues `run`.
    fn extends(&self, run: &Run, pkt: &[u8], seg: &Segment) -> bool {
        let f = &run.first;
        if run.closed
            || run.segments >= MAX_SEGMENTS
            || seg.v6 != f.v6
            || seg.tcp_len != f.tcp_len
            || seg.seq != run.next_seq
            || seg.payload > f.payload
            || self.out.len() - run.start - VNET_HDR_LEN + seg.payload > MAX_IP_LEN
        {
            return false;
        }
        let head = &self.out[run.start + VNET_HDR_LEN..];
        let same_ip = if f.v6 {
            // Version, traffic class, flow label; hop limit; addresses.
            head[..4] == pkt[..4] && head[7..40] == pkt[7..40]
        } else {
            // TOS; DF; TTL and protocol; addresses; the ID counting up.
            head[1] == pkt[1]
                && head[6..10] == pkt[6..10]
                && head[12..20] == pkt[12..20]
                && seg.ip_id == run.next_id
        };
        let (ht, pt) = (&head[f.ip_len..], &pkt[f.ip_len..]);
        // Ports; ack; offset (and the flags already judged); window; urgent pointer; options.
        same_ip
            && ht[..4] == pt[..4]
            && ht[8..13] == pt[8..13]
            && ht[14..16] == pt[14..16]
            && ht[18..f.tcp_len] == pt[18..f.tcp_len]
    }

    fn alone(&mut self, pkt: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; VNET_HDR_LEN]);
        self.out.extend_from_slice(pkt);
        self.frames.push((start, self.out.len()));
        self.stats.frames += 1;
    }

    /// Ends the open run: its frame gets its GSO header and merged IP/TCP header.
    fn close(&mut self) {
        let Some(run) = self.run.take() else { return };
        self.frames.push((run.start, self.out.len()));
        self.stats.frames += 1;
        if run.segments < 2 {
            return;
        }
        self.stats.merged += run.segments as u64;
        let f = run.first;
        let frame = &mut self.out[run.start..];
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if f.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (f.ip_len + f.tcp_len) as u16,
            gso_size: f.payload as u16,
            csum_start: f.ip_len as u16,
            csum_offset: 16,
        }
        .write(frame);
        let pkt = &mut frame[VNET_HDR_LEN..];
        let total = pkt.len();
        if f.v6 {
            pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            pkt[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&pkt[..20], 0));
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        }
        if run.psh {
            pkt[f.ip_len + 13] |= TCP_PSH;
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not inverted.
        let c = fold(pseudo_sum(pkt, f.v6, PROTO_TCP, total - f.ip_len));
        pkt[f.ip_len + 16..f.ip_len + 18].copy_from_slice(&c.to_be_bytes());
    }

    /// Ends the batch: every frame, in order (header + packet), to be written one by one.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> {
        self.close();
        self.frames.iter().map(|&(a, b)| &self.out[a..b])
    }

    /// Forgets the batch's frames (keeps the buffers).
    pub fn clear(&mut self) {
        self.run = None;
        self.out.clear();
        self.frames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One TCP segment with right checksums.
    #[derive(Clone)]
    struct Seg {
        v6: bool,
        src_port: u16,
        seq: u32,
        id: u16,
        flags: u8,
        payload: Vec<u8>,
        ts: u32,
    }

    impl Seg {
        fn new(v6: bool, seq: u32, id: u16, len: usize) -> Seg {
            Seg {
                v6,
                src_port: 5201,
                seq,
                id,
                flags: TCP_ACK,
                payload: (0..len).map(|i| (i as u32 ^ seq) as u8).collect(),
                ts: 77,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut tcp = Vec::new();
            tcp.extend_from_slice(&self.src_port.to_be_bytes());
            tcp.extend_from_slice(&40_000u16.to_be_bytes());
            tcp.extend_from_slice(&self.seq.to_be_bytes());
            tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes());
            tcp.extend_from_slice(&[(32 / 4) << 4, self.flags]);
            tcp.extend_from_slice(&512u16.to_be_bytes());
            tcp.extend_from_slice(&[0, 0, 0, 0]);
            // NOP NOP timestamps
            tcp.extend_from_slice(&[1, 1, 8, 10]);
            tcp.extend_from_slice(&self.ts.to_be_bytes());
            tcp.extend_from_slice(&9u32.to_be_bytes());
            tcp.extend_from_slice(&self.payload);
            let mut pkt = if self.v6 {
                let mut h = vec![0x60, 0, 0, 7];
                h.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                h.extend_from_slice(&[PROTO_TCP, 63]);
                h.extend_from_slice(&[0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5]);
                h.extend_from_slice(&[0xfd, 0, 0, 0x10, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 6]);
                h
            } else {
                let mut h = vec![0x45, 0];
                h.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
                h.extend_from_slice(&self.id.to_be_bytes());
                h.extend_from_slice(&[0x40, 0, 63, PROTO_TCP, 0, 0]);
                h.extend_from_slice(&[10, 244, 1, 5, 10, 244, 2, 6]);
                let c = !fold(sum(&h, 0));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h
            };
            let ip_len = pkt.len();
            pkt.extend_from_slice(&tcp);
            let c = !fold(sum(
                &pkt[ip_len..],
                pseudo_sum(&pkt, self.v6, PROTO_TCP, tcp.len()),
            ));
            pkt[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
            pkt
        }
    }

    /// What the kernel makes of a frame: the packets it stands for (GSO cut back into
    /// segments as `tcp_gso_segment`/`inet_gso_segment` do, checksums completed).
    fn kernel_view(frame: &[u8]) -> Vec<Vec<u8>> {
        let h = VnetHdr::parse(frame).expect("header");
        let pkt = &frame[VNET_HDR_LEN..];
        if h.gso_type == GSO_NONE {
            assert_eq!(h.flags, 0, "a frame written alone has an empty header");
            return vec![pkt.to_vec()];
        }
        assert_eq!(h.flags, F_NEEDS_CSUM);
        let v6 = h.gso_type == GSO_TCPV6;
        let ip_len = usize::from(h.csum_start);
        assert_eq!(ip_len, if v6 { 40 } else { 20 });
        assert_eq!(h.csum_offset, 16);
        let hdr_len = usize::from(h.hdr_len);
        let mss = usize::from(h.gso_size);
        // The partial checksum is the pseudo-header sum of the whole merged segment.
        let want = fold(pseudo_sum(pkt, v6, PROTO_TCP, pkt.len() - ip_len));
        assert_eq!(be16(pkt, ip_len + 16), want, "partial checksum");
        if !v6 {
            assert_eq!(usize::from(be16(pkt, 2)), pkt.len());
            assert_eq!(fold(sum(&pkt[..20], 0)), 0xffff, "IPv4 header checksum");
        } else {
            assert_eq!(usize::from(be16(pkt, 4)) + 40, pkt.len());
        }
        let payload = &pkt[hdr_len..];
        let chunks: Vec<&[u8]> = payload.chunks(mss).collect();
        let (seq0, id0) = (be32(pkt, ip_len + 4), be16(pkt, 4));
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut s = pkt[..hdr_len].to_vec();
                s.extend_from_slice(chunk);
                let tcp_total = s.len() - ip_len;
                if v6 {
                    s[4..6].copy_from_slice(&(tcp_total as u16).to_be_bytes());
                } else {
                    let total = s.len() as u16;
                    s[2..4].copy_from_slice(&total.to_be_bytes());
                    s[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
                    s[10..12].copy_from_slice(&[0, 0]);
                    let c = !fold(sum(&s[..20], 0));
                    s[10..12].copy_from_slice(&c.to_be_bytes());
                }
                let seq = seq0.wrapping_add((i * mss) as u32);
                s[ip_len + 4..ip_len + 8].copy_from_slice(&seq.to_be_bytes());
                if i + 1 < chunks.len() {
                    s[ip_len + 13] &= !TCP_PSH;
                }
                s[ip_len + 16..ip_len + 18].copy_from_slice(&[0, 0]);
                let c = !fold(sum(&s[ip_len..], pseudo_sum(&s, v6, PROTO_TCP, tcp_total)));
                s[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
                s
            })
            .collect()
    }

    fn run(packets: &[Vec<u8>]) -> (Vec<Vec<u8>>, GroStats) {
        let mut gro = Gro::default();
        for p in packets {
            gro.push(p);
        }
        let frames = gro.finish().map(<[u8]>::to_vec).collect();
        gro.clear();
        (frames, gro.stats)
    }

    fn stream(v6: bool, n: usize, mss: usize) -> Vec<Seg> {
        (0..n)
            .map(|i| Seg::new(v6, 1000 + (i * mss) as u32, 300 + i as u16, mss))
            .collect()
    }

    fn unmerged(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        frames.iter().flat_map(|f| kernel_view(f)).collect()
    }

    #[test]
    fn a_run_of_segments_becomes_one_frame_the_kernel_cuts_back_into_the_same_segments() {
        for v6 in [false, true] {
            let mut segs = stream(v6, 10, 1388);
            segs[9].payload.truncate(500);
            segs[9].flags = TCP_ACK | TCP_PSH;
            let packets: Vec<Vec<u8>> = segs.iter().map(Seg::bytes).collect();
            let (frames, stats) = run(&packets);
            assert_eq!(frames.len(), 1, "v6={v6}");
            let h = VnetHdr::parse(&frames[0]).expect("header");
            assert_eq!(h.gso_size, 1388);
            assert_eq!(h.hdr_len, if v6 { 40 + 32 } else { 20 + 32 });
            assert_eq!(unmerged(&frames), packets, "v6={v6}");
            assert_eq!(
                stats,
                GroStats {
                    packets: 10,
                    frames: 1,
                    merged: 10
                }
            );
        }
    }

    #[test]
    fn merging_off_writes_every_packet_alone() {
        let packets: Vec<Vec<u8>> = stream(false, 5, 1000).iter().map(Seg::bytes).collect();
        let mut gro = Gro::new(false);
        for p in &packets {
            gro.push(p);
        }
        let frames: Vec<Vec<u8>> = gro.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(frames.len(), 5);
        assert_eq!(unmerged(&frames), packets);
        assert_eq!(gro.stats.merged, 0);
    }

    #[test]
    fn a_gap_a_short_segment_or_a_psh_ends_the_run() {
        let mut segs = stream(false, 9, 1000);
        segs[2].seq += 1; // a gap before 2 (and 2 no longer continues 1)
        for s in &mut segs[3..] {
            s.seq += 1;
        }
        segs[4].payload.truncate(10); // short: ends the run 2..=4
        for s in &mut segs[5..] {
            s.seq -= 990;
        }
        segs[6].flags |= TCP_PSH; // ends the run 5..=6
        let packets: Vec<Vec<u8>> = segs.iter().map(Seg::bytes).collect();
        let (frames, _) = run(&packets);
        let segments: Vec<usize> = frames.iter().map(|f| kernel_view(f).len()).collect();
        assert_eq!(segments, vec![2, 3, 2, 2]);
        assert_eq!(unmerged(&frames), packets);
    }

    #[test]
    fn packets_that_may_not_be_merged_go_alone_and_unchanged() {
        let base = stream(false, 2, 800);
        let mut bad_sum = base[1].bytes();
        let n = bad_sum.len();
        bad_sum[n - 1] ^= 0xff; // payload corrupted: checksum wrong
        let mut syn = base[1].clone();
        syn.flags = 0x02;
        let mut other_ts = base[1].clone();
        other_ts.ts = 78;
        let mut other_id = base[1].clone();
        other_id.id += 5;
        let mut longer = base[1].clone();
        longer.payload.push(1);
        let mut udp = base[0].bytes();
        udp[9] = 17;
        let mut options = base[0].bytes();
        options[0] = 0x46; // IHL 6: IPv4 options
        let no_payload = Seg::new(false, 1000, 300, 0).bytes();
        for second in [
            bad_sum,
            syn.bytes(),
            other_ts.bytes(),
            other_id.bytes(),
            longer.bytes(),
            udp,
            options,
            no_payload,
        ] {
            let packets = vec![base[0].bytes(), second];
            let (frames, stats) = run(&packets);
            assert_eq!(frames.len(), 2);
            assert_eq!(stats.merged, 0);
            for (f, p) in frames.iter().zip(&packets) {
                assert_eq!(VnetHdr::parse(f), Some(VnetHdr::default()));
                assert_eq!(&f[VNET_HDR_LEN..], &p[..]);
            }
        }
    }

    #[test]
    fn a_run_stops_at_64_kib_and_at_max_segments() {
        let packets: Vec<Vec<u8>> = stream(false, 60, 1400).iter().map(Seg::bytes).collect();
        let (frames, _) = run(&packets);
        let sizes: Vec<usize> = frames.iter().map(|f| f.len() - VNET_HDR_LEN).collect();
        assert!(sizes.iter().all(|&s| s <= MAX_IP_LEN), "{sizes:?}");
        assert_eq!(frames.len(), 2, "{sizes:?}");
        assert_eq!(unmerged(&frames), packets);
        let packets: Vec<Vec<u8>> = stream(true, 130, 100).iter().map(Seg::bytes).collect();
        let (frames, _) = run(&packets);
        let segments: Vec<usize> = frames.iter().map(|f| kernel_view(f).len()).collect();
        assert_eq!(segments, vec![64, 64, 2]);
        assert_eq!(unmerged(&frames), packets);
    }

    /// Random batches from three flows in both families, with gaps, short segments, PSH,
    /// corrupted and foreign packets: what the kernel makes of the frames is exactly the
    /// packets pushed, in order.
    #[test]
    fn any_batch_comes_out_as_the_packets_that_went_in() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut total = GroStats::default();
        for _ in 0..300 {
            let mut flows: Vec<Seg> = (0..3)
                .map(|i| {
                    let mut s = Seg::new(i == 1, 7 + i as u32 * 1_000_000, 40 * i as u16, 0);
                    s.src_port += i as u16;
                    s
                })
                .collect();
            let mut packets = Vec::new();
            let mut cur = 0;
            for _ in 0..rnd(100) {
                if rnd(5) == 0 {
                    cur = rnd(3) as usize;
                }
                let f = &mut flows[cur];
                let len = match rnd(10) {
                    0 => rnd(1400) as usize,
                    _ => 1200,
                };
                let mut s = Seg::new(f.v6, f.seq, f.id, len);
                s.src_port = f.src_port;
                if rnd(20) == 0 {
                    s.flags |= TCP_PSH;
                }
                if rnd(30) == 0 {
                    s.ts += 1;
                }
                let mut bytes = s.bytes();
                if rnd(50) == 0 {
                    let i = rnd(bytes.len() as u64) as usize;
                    bytes[i] ^= 0x10;
                }
                if rnd(40) == 0 {
                    bytes[9] = 17;
                }
                packets.push(bytes);
                f.seq = f.seq.wrapping_add(len as u32 + u32::from(rnd(15) == 0));
                f.id = f.id.wrapping_add(1);
            }
            let mut gro = Gro {
                stats: total,
                ..Gro::default()
            };
            for p in &packets {
                gro.push(p);
            }
            let frames: Vec<Vec<u8>> = gro.finish().map(<[u8]>::to_vec).collect();
            total = gro.stats;
            assert_eq!(unmerged(&frames), packets);
        }
        assert!(total.merged > total.packets / 2, "{total:?}");
        assert!(total.frames < total.packets, "{total:?}");
    }

    #[test]
    fn a_packet_read_with_needs_csum_gets_its_checksum() {
        for v6 in [false, true] {
            let want = Seg::new(v6, 5, 6, 333).bytes();
            let ip_len = if v6 { 40 } else { 20 };
            let mut pkt = want.clone();
            let partial = fold(pseudo_sum(&pkt, v6, PROTO_TCP, pkt.len() - ip_len));
            pkt[ip_len + 16..ip_len + 18].copy_from_slice(&partial.to_be_bytes());
            let h = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: ip_len as u16,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            assert!(complete_checksum(&mut pkt, &h));
            assert_eq!(pkt, want);
            let h = VnetHdr {
                csum_start: pkt.len() as u16,
                ..h
            };
            assert!(!complete_checksum(&mut pkt, &h));
        }
    }
}
