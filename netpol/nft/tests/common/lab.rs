//! A routed "node" with pods behind it, for traffic tests (include with
//! `#[path = "common/lab.rs"] mod lab;` next to `mod common;`).
//!
//! ```text
//!   pod ns (eth0 10.244.0.N/32, fd00:10:244::N/128) ── veth ── node ns (weftpK: /32 + /128 route)
//! ```
//!
//! Wired as weft's CNI wires pods: routed veths (no bridge) whose node-side names start with
//! `weft`, a /32 (/128) route per pod on the node, a default route via the node in each pod
//! (10.244.0.1 and fe80::1 on every node-side veth), forwarding on in the node namespace only,
//! `rp_filter` off and DAD off everywhere (so only weft's ruleset judges sources, and IPv6
//! addresses are usable at once). Every namespace is a [`Netns`] guard: removed on drop, also
//! when the test panics. Nothing here runs outside those namespaces.
//!
//! Also: threads inside a namespace ([`spawn_in`]), TCP/UDP servers that stop on a flag, and
//! one-shot probes from a fixed source address and port ([`tcp_probe`], [`udp_probe`]).

#![allow(dead_code)] // each test binary uses a part of it

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::Netns;

/// Address of the node on every pod link (the pods' gateway).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Link-local address of the node on every pod link.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv4 address of pod host number `n`.
pub fn pod_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, n)
}

/// The IPv6 address of pod host number `n`.
pub fn pod_v6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, u16::from(n))
}

/// One pod: its namespace, the node-side interface and its addresses.
pub struct PodNet {
    /// The pod's namespace (its interface is `eth0`).
    pub ns: Netns,
    /// The host side of its veth, in the node namespace.
    pub iface: String,
    /// IPv4 address.
    pub v4: Ipv4Addr,
    /// IPv6 address.
    pub v6: Ipv6Addr,
}

impl PodNet {
    /// The pod's address of a family.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.v6)
        } else {
            IpAddr::V4(self.v4)
        }
    }
}

/// The node namespace and its pods. Pods are dropped (removed) first, then the node.
pub struct Lab {
    /// Pods in the order given to [`Lab::new`].
    pub pods: Vec<PodNet>,
    /// The node: routes between the pods, carries weft's table.
    pub node: Netns,
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets sysctls inside a namespace.
pub fn sysctl(ns: &Netns, settings: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
        .args(settings)
        .output()
        .expect("run sysctl");
    assert!(
        out.status.success(),
        "sysctl {settings:?} in {} failed: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

const QUIET: &[&str] = &[
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
];

impl Lab {
    /// A node and one pod per host number (10.244.0.N, fd00:10:244::N), pod `i` behind the
    /// node-side interface `weftp<i>`.
    pub fn new(hosts: &[u8]) -> Lab {
        let node = Netns::new();
        sysctl(&node, QUIET);
        sysctl(
            &node,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
        ip(&["-n", &node.name, "link", "set", "lo", "up"]);
        let mut pods = Vec::new();
        for (i, &n) in hosts.iter().enumerate() {
            let ns = Netns::new();
            sysctl(&ns, QUIET);
            let iface = format!("weftp{i}");
            let (v4, v6) = (pod_v4(n), pod_v6(n));
            let (nn, pn) = (node.name.as_str(), ns.name.as_str());
            #[rustfmt::skip]
            let steps: [&[&str]; 12] = [
                &["-n", nn, "link", "add", &iface, "type", "veth", "peer", "name", "eth0", "netns", pn],
                &["-n", nn, "link", "set", &iface, "up"],
                &["-n", nn, "addr", "add", "10.244.0.1/32", "dev", &iface],
                &["-n", nn, "addr", "add", "fe80::1/64", "dev", &iface, "nodad"],
                &["-n", nn, "route", "add", &format!("{v4}/32"), "dev", &iface],
                &["-n", nn, "-6", "route", "add", &format!("{v6}/128"), "dev", &iface],
                &["-n", pn, "link", "set", "eth0", "up"],
                &["-n", pn, "addr", "add", &format!("{v4}/32"), "dev", "eth0"],
                &["-n", pn, "-6", "addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"],
                &["-n", pn, "route", "add", "10.244.0.1", "dev", "eth0", "scope", "link"],
                &["-n", pn, "route", "add", "default", "via", "10.244.0.1", "dev", "eth0"],
                &["-n", pn, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"],
            ];
            for step in steps {
                ip(step);
            }
            pods.push(PodNet { ns, iface, v4, v6 });
        }
        Lab { pods, node }
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Runs `f` on a new thread inside `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

/// Sets a flag when dropped (also on panic), so that threads polling it stop.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Starts, inside `ns`, a TCP listener and a UDP echo server on `[::]:port` (dual stack).
/// They run until `stop` is set; returns once both are bound.
pub fn start_servers(
    ns: &Netns,
    tcp_port: u16,
    udp_port: u16,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tcp_stop = stop.clone();
    let tcp_ready = tx.clone();
    let tcp = spawn_in(ns, move || {
        let l = TcpListener::bind(("::", tcp_port)).expect("bind the TCP server");
        l.set_nonblocking(true).unwrap();
        tcp_ready.send(()).unwrap();
        while !tcp_stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => drop(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    let udp = spawn_in(ns, move || {
        let s = UdpSocket::bind(("::", udp_port)).expect("bind the UDP server");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = s.send_to(&buf[..n], from);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("UDP server: {e}"),
            }
        }
    });
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("servers bound");
    }
    vec![tcp, udp]
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// A raw socket (`IPPROTO_RAW`: the caller writes the whole IP header) of a family.
pub fn raw_socket(v6: bool) -> io::Result<OwnedFd> {
    let af = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(af, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    check(fd, "raw socket")?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one datagram on a socket to `dst` (for raw sockets the port must be 0).
pub fn send_to(fd: &OwnedFd, packet: &[u8], dst: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sockaddr(dst);
    // SAFETY: buffer and address are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(ss).cast(),
            len,
        )
    };
    check(n as libc::c_int, "sendto")?;
    Ok(())
}

/// Outcome of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Connected (TCP) or answered (UDP).
    Reached,
    /// Nothing within the timeout (what a `drop` looks like).
    TimedOut,
    /// An error other than a timeout (errno).
    Error(i32),
}

/// One TCP connection attempt from `src` (address and port, bound first) to `dst`.
pub fn tcp_probe(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<Reach> {
    let af = if src.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            af,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    check(fd, "tcp socket")?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (sa, sl) = sockaddr(&src);
    // SAFETY: valid fd and address.
    check(
        unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(sa).cast(), sl) },
        "bind",
    )?;
    // Close with RST, leaving no TIME_WAIT behind.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, option of the right size.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        },
        "SO_LINGER",
    )?;
    let (da, dl) = sockaddr(&dst);
    // SAFETY: valid fd and address.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(da).cast(), dl) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Ok(Reach::Error(e.raw_os_error().unwrap_or(-1)));
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Reach::TimedOut);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 10_000) as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, out-pointers of the right size.
        check(
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::addr_of_mut!(err).cast(),
                    &mut len,
                )
            },
            "SO_ERROR",
        )?;
        return Ok(if err == 0 {
            Reach::Reached
        } else {
            Reach::Error(err)
        });
    }
}

/// One UDP request/response from `src` (bound first) to an echo server at `dst`.
pub fn udp_probe(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<Reach> {
    let s = UdpSocket::bind(src)?;
    let tag = format!("probe {src} -> {dst}");
    s.send_to(tag.as_bytes(), dst)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Reach::TimedOut);
        }
        s.set_read_timeout(Some(left))?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == dst && &buf[..n] == tag.as_bytes() => {
                return Ok(Reach::Reached);
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Reach::TimedOut);
            }
            Err(e) => return Ok(Reach::Error(e.raw_os_error().unwrap_or(-1))),
        }
    }
}
