//! Kernel test support: throwaway network namespaces (always deleted, also on panic),
//! commands inside them, and tiny ICMP/TCP/UDP probes run from threads inside a namespace.
//! Nothing here touches the root namespace's links, routes or firewall.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use weft_dataplane::netns;

/// Whether this process may create namespaces (root); kernel tests skip otherwise.
pub fn can_run() -> bool {
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        && std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
    if !ok {
        eprintln!("skipping: kernel tests need root and iproute2");
    }
    ok
}

/// A network namespace created with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wdp{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `ip -n NAME args…`, must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec NAME args…`, must succeed (bounded by `timeout 20`).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["timeout", "20", "ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Forwarding on, through the library (from a thread inside the namespace).
    pub fn forwarding(&self) {
        in_ns(self, weft_dataplane::overlay::enable_forwarding).expect("enable forwarding");
        let v4 = self.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
        assert_eq!(v4.trim(), "1", "forwarding set in {}", self.name);
    }

    /// Run async netlink work in this namespace.
    pub fn netlink<F, Fut, T>(&self, work: F) -> T
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        netns::run_in_blocking(&self.path(), work).expect("netns work")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns<T: Send + 'static>(ns: &Netns, work: impl FnOnce() -> T + Send + 'static) -> T {
    netns::spawn_in(&ns.path(), work)
        .expect("spawn")
        .join()
        .expect("join")
        .expect("enter netns")
}

/// One ICMP echo from inside `ns` to `dst`, answered within 2 s.
pub fn ping(ns: &Netns, dst: IpAddr) -> bool {
    in_ns(ns, move || icmp_echo(dst).unwrap_or(false))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(dst: IpAddr) -> std::io::Result<bool> {
    let (domain, proto, request_type, reply_type) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let ident = (std::process::id() & 0xffff) as u16;
    let mut packet = vec![request_type, 0, 0, 0];
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    packet.extend_from_slice(b"weft-probe");
    if dst.is_ipv4() {
        let c = checksum(&packet);
        packet[2..4].copy_from_slice(&c.to_be_bytes());
    } // ICMPv6: the kernel fills the checksum on raw ICMPv6 sockets
    // A raw socket is a datagram socket as far as std is concerned: reuse its safe API.
    let sock: UdpSocket = sock.into();
    sock.send_to(&packet, SocketAddr::new(dst, 0))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut bytes = [0u8; 1500];
    while Instant::now() < deadline {
        let (n, from) = match sock.recv_from(&mut bytes) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        let bytes = &bytes[..n];
        let icmp = if dst.is_ipv4() {
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            &bytes[ihl..]
        } else {
            bytes
        };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
            && from.ip() == dst
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// TCP and UDP echo servers on `[::]:port` in `ns` (dual-stack), serving until dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), netns::NetnsError>>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = netns::spawn_in(&ns.path(), move || {
            let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
            tcp.set_nonblocking(true).expect("nonblocking");
            let udp = UdpSocket::bind(("::", port)).expect("bind udp");
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 256];
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((mut conn, _)) = tcp.accept() {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    if let Ok(n) = conn.read(&mut buf) {
                        let _ = conn.write_all(&buf[..n]);
                    }
                }
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], peer);
                }
            }
        })
        .expect("spawn echo server");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server ready");
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect from `ns` to `dst:port` over TCP, send a line, expect it back (bounded).
pub fn tcp_echo(ns: &Netns, dst: IpAddr, port: u16) -> bool {
    in_ns(ns, move || {
        let run = || -> std::io::Result<bool> {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::new(dst, port), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"weft tcp")?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf)?;
            Ok(&buf[..n] == b"weft tcp")
        };
        run().unwrap_or(false)
    })
}

/// Send a UDP datagram from `ns` to `dst:port`, expect it back (bounded; a few tries).
pub fn udp_echo(ns: &Netns, dst: IpAddr, port: u16) -> bool {
    in_ns(ns, move || {
        let run = || -> std::io::Result<bool> {
            let bind: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            for _ in 0..4 {
                s.send_to(b"weft udp", SocketAddr::new(dst, port))?;
                let mut buf = [0u8; 16];
                if let Ok((n, from)) = s.recv_from(&mut buf)
                    && &buf[..n] == b"weft udp"
                    && from.ip() == dst
                {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        run().unwrap_or(false)
    })
}
