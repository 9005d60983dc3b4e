//! One connection attempt from inside a pod's network namespace: TCP connect, UDP
//! request/response, and SCTP without SCTP sockets.
//!
//! Every function here runs on the calling thread, which must already be in the client pod's
//! namespace ([`super::netns::enter`]).
//!
//! SCTP: this kernel has no SCTP sockets (no `sctp` module), so the client sends a raw SCTP
//! INIT (with a correct CRC32c, or conntrack in the nodes would call it invalid) through an
//! `IPPROTO_RAW` socket, which never receives anything, and watches its namespace's ICMP. The
//! server pod's kernel has no SCTP either, so a delivered INIT is answered with ICMP protocol
//! unreachable (IPv6: parameter problem, unrecognized next header), which conntrack relates to
//! the INIT's flow and translates back through kube-proxy's DNAT. That answer counts as
//! connected; silence until the timeout as blocked. (`IPPROTO_RAW` rather than a raw socket of
//! protocol 132: a server pod that happens to hold such a socket while probing would swallow
//! the INIT and never answer.)

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};

use crate::runner::Observation;

/// The payload a UDP probe sends; the servers echo it.
pub const UDP_HELLO: &[u8] = b"weft-probe";

/// TCP: connected if the handshake completes within `timeout`; refused or silent = blocked.
pub fn tcp(dst: SocketAddr, timeout: Duration) -> Observation {
    match TcpStream::connect_timeout(&dst, timeout) {
        Ok(_) => Observation::Connected,
        Err(e) if blocked_error(&e) => Observation::Blocked,
        Err(e) => Observation::NotObserved(format!("tcp connect {dst}: {e}")),
    }
}

fn blocked_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::TimedOut
            | ErrorKind::WouldBlock
            | ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::PermissionDenied
    ) || matches!(
        e.raw_os_error(),
        Some(libc_errno::EHOSTUNREACH | libc_errno::ENETUNREACH | libc_errno::EPERM)
    )
}

/// errno values not in `ErrorKind` on every toolchain.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENETUNREACH: i32 = 101;
    pub const EHOSTUNREACH: i32 = 113;
}

/// UDP: connected if the server's echo comes back within `timeout` (the request is sent again
/// every quarter of it, a lost first datagram is not a verdict); an ICMP error or silence =
/// blocked.
pub fn udp(dst: SocketAddr, timeout: Duration) -> Observation {
    let bind: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = match UdpSocket::bind(bind).and_then(|s| s.connect(dst).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return Observation::NotObserved(format!("udp socket to {dst}: {e}")),
    };
    let deadline = Instant::now() + timeout;
    let slice = timeout / 4;
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Observation::Blocked;
        }
        if let Err(e) = socket.send(UDP_HELLO) {
            if blocked_error(&e) {
                return Observation::Blocked;
            }
            return Observation::NotObserved(format!("udp send to {dst}: {e}"));
        }
        let wait = slice.min(deadline - now).max(Duration::from_millis(1));
        if let Err(e) = socket.set_read_timeout(Some(wait)) {
            return Observation::NotObserved(format!("udp timeout: {e}"));
        }
        match socket.recv(&mut buf) {
            Ok(n) if &buf[..n] == UDP_HELLO => return Observation::Connected,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if blocked_error(&e) => return Observation::Blocked,
            Err(e) => return Observation::NotObserved(format!("udp recv from {dst}: {e}")),
        }
    }
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), as SCTP's checksum (RFC 9260 §6.8).
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// An SCTP packet (common header + INIT chunk) with its checksum filled in.
pub fn sctp_init(src_port: u16, dst_port: u16, initiate_tag: u32, tsn: u32) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0..2].copy_from_slice(&src_port.to_be_bytes());
    p[2..4].copy_from_slice(&dst_port.to_be_bytes());
    // verification tag 0 (an INIT), checksum 0 while computing
    p[12] = 1; // chunk type INIT
    p[13] = 0; // flags
    p[14..16].copy_from_slice(&20u16.to_be_bytes()); // chunk length
    p[16..20].copy_from_slice(&initiate_tag.to_be_bytes());
    p[20..24].copy_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p[24..26].copy_from_slice(&10u16.to_be_bytes()); // outbound streams
    p[26..28].copy_from_slice(&10u16.to_be_bytes()); // inbound streams
    p[28..32].copy_from_slice(&tsn.to_be_bytes());
    // The CRC32c goes in as the kernel writes it (cpu_to_le32 of the final value).
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// A source port per SCTP probe, so concurrent probes of one namespace tell their answers apart.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn next_src_port() -> u16 {
    // 20000..=60000, wrapping
    20_000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 40_000
}

/// SCTP: sends an INIT from `src` to `dst` and waits up to `timeout` for the ICMP answer that
/// says the INIT reached a kernel (see the module docs).
pub fn sctp(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Observation {
    let src_port = next_src_port();
    let tag = 0x5746_0000 | u32::from(src_port);
    let init = sctp_init(src_port, dst.port(), tag, tag.rotate_left(7));
    let (domain, icmp_proto, packet) = match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            (Domain::IPV4, SockProtocol::ICMPV4, ipv4_packet(s, d, &init))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            (Domain::IPV6, SockProtocol::ICMPV6, ipv6_packet(s, d, &init))
        }
        _ => return Observation::NotObserved(format!("sctp: {src} and {dst} differ in family")),
    };
    // Listen first, so the answer cannot come before the listener.
    let mut icmp = match Socket::new(domain, Type::RAW, Some(icmp_proto)) {
        Ok(s) => s,
        Err(e) => return Observation::NotObserved(format!("raw icmp socket: {e}")),
    };
    let sender = match Socket::new(domain, Type::RAW, Some(SockProtocol::from(255))) {
        Ok(s) => s,
        Err(e) => return Observation::NotObserved(format!("raw socket: {e}")),
    };
    let to = SockAddr::from(SocketAddr::new(dst.ip(), 0));
    if let Err(e) = sender.send_to(&packet, &to) {
        if blocked_error(&e) {
            return Observation::Blocked;
        }
        return Observation::NotObserved(format!("sctp INIT to {dst}: {e}"));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Observation::Blocked;
        }
        if let Err(e) = icmp.set_read_timeout(Some(deadline - now)) {
            return Observation::NotObserved(format!("icmp timeout: {e}"));
        }
        match icmp.read(&mut buf) {
            Ok(n) => {
                let answered = match domain {
                    Domain::IPV4 => icmp4_answers(&buf[..n], src_port, dst.port()),
                    _ => icmp6_answers(&buf[..n], src_port, dst.port()),
                };
                if answered {
                    return Observation::Connected;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Observation::Blocked;
            }
            Err(e) => return Observation::NotObserved(format!("icmp read: {e}")),
        }
    }
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // ttl
    p[9] = 132; // SCTP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    // the kernel fills in the header checksum (and the id) of IP_HDRINCL packets
    p.extend_from_slice(payload);
    p
}

fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p[6] = 132; // next header: SCTP
    p[7] = 64; // hop limit
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An IPv4 packet (as a raw ICMP socket reads it, IP header first): destination unreachable,
/// protocol unreachable, about an SCTP packet with these ports.
pub fn icmp4_answers(p: &[u8], src_port: u16, dst_port: u16) -> bool {
    let Some(&vihl) = p.first() else { return false };
    let ihl = usize::from(vihl & 0x0f) * 4;
    let Some(icmp) = p.get(ihl..) else {
        return false;
    };
    if icmp.len() < 8 || icmp[0] != 3 || icmp[1] != 2 {
        return false;
    }
    let inner = &icmp[8..];
    let Some(&ivihl) = inner.first() else {
        return false;
    };
    let iihl = usize::from(ivihl & 0x0f) * 4;
    inner.len() >= iihl + 4
        && inner[9] == 132
        && inner[iihl..iihl + 2] == src_port.to_be_bytes()
        && inner[iihl + 2..iihl + 4] == dst_port.to_be_bytes()
}

/// An ICMPv6 message (as a raw ICMPv6 socket reads it, no IPv6 header): parameter problem,
/// unrecognized next header, about an SCTP packet with these ports.
pub fn icmp6_answers(p: &[u8], src_port: u16, dst_port: u16) -> bool {
    if p.len() < 8 + 40 + 4 || p[0] != 4 || p[1] != 1 {
        return false;
    }
    let inner = &p[8..];
    inner[6] == 132
        && inner[40..42] == src_port.to_be_bytes()
        && inner[42..44] == dst_port.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        // The check value of CRC-32C (Castagnoli): "123456789" -> 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 (iSCSI) B.4: 32 bytes of zeros -> 0x8A9136AA, of 0xff -> 0x62A8AB43.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn the_init_carries_its_checksum_little_endian() {
        let p = sctp_init(40000, 80, 0x1234_5678, 1);
        assert_eq!(&p[0..4], &[0x9c, 0x40, 0x00, 0x50]);
        assert_eq!(&p[12..16], &[1, 0, 0, 20]);
        let mut zeroed = p;
        zeroed[8..12].copy_from_slice(&[0; 4]);
        let crc = crc32c(&zeroed);
        assert_eq!(u32::from_le_bytes([p[8], p[9], p[10], p[11]]), crc);
    }

    #[test]
    fn icmp_answers_are_matched_by_ports() {
        let init = sctp_init(40001, 81, 7, 7);
        let inner = ipv4_packet(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            &init,
        );
        let mut packet = ipv4_packet(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
        packet[9] = 1;
        packet.extend_from_slice(&[3, 2, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(&inner[..28]);
        assert!(icmp4_answers(&packet, 40001, 81));
        assert!(!icmp4_answers(&packet, 40002, 81));
        packet[21] = 3; // port unreachable is not the answer to an INIT
        assert!(!icmp4_answers(&packet, 40001, 81));

        let inner6 = ipv6_packet(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, &init);
        let mut icmp6 = vec![4, 1, 0, 0, 0, 0, 0, 6];
        icmp6.extend_from_slice(&inner6);
        assert!(icmp6_answers(&icmp6, 40001, 81));
        assert!(!icmp6_answers(&icmp6, 40001, 80));
    }
}
