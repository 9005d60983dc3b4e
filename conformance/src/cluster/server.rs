//! The pod's servers: one thread per pod, in the pod's namespace, serving every (port,
//! protocol) of the case: TCP (accept and close: the handshake is the answer) and UDP (echo).
//! Dual-stack sockets (`[::]`, not v6-only). SCTP needs no server: the pod's kernel answers an
//! INIT itself (see [`super::probe`]).
//!
//! The thread also lifts the namespace's ICMP rate limits, so an SCTP probe's answer is never
//! rate-limited away.

use std::fs::File;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Socket, Type};
use weft_netpol::ruleset::Protocol;

use super::netns;

/// A running server thread; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Starts serving `endpoints` in the namespace; returns once every socket is bound.
    pub fn start(ns: &File, endpoints: &[(u16, Protocol)], label: &str) -> Result<Servers, String> {
        let ns = ns.try_clone().map_err(|e| format!("netns fd: {e}"))?;
        let endpoints = endpoints.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("serve-{label}"))
            .spawn(move || serve(&ns, &endpoints, &flag, &ready_tx))
            .map_err(|e| format!("spawn server thread: {e}"))?;
        let servers = Servers {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(servers),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("server thread did not start".into()),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind(port: u16, protocol: Protocol) -> std::io::Result<Option<Listener>> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
        _ => return Ok(None),
    };
    let socket = Socket::new(Domain::IPV6, ty, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(Some(match protocol {
        Protocol::Tcp => {
            socket.listen(1024)?;
            Listener::Tcp(socket.into())
        }
        _ => Listener::Udp(socket.into()),
    }))
}

fn serve(
    ns: &File,
    endpoints: &[(u16, Protocol)],
    stop: &AtomicBool,
    ready: &mpsc::Sender<Result<(), String>>,
) {
    if let Err(e) = netns::enter(ns) {
        let _ = ready.send(Err(format!("setns: {e}")));
        return;
    }
    // /proc/sys/net is the namespace of the thread that opens it.
    for (file, value) in [
        ("/proc/sys/net/ipv4/icmp_ratelimit", "0"),
        ("/proc/sys/net/ipv6/icmp/ratelimit", "0"),
        ("/proc/sys/net/ipv4/icmp_msgs_per_sec", "100000"),
    ] {
        let _ = std::fs::write(file, value);
    }
    let mut listeners = Vec::new();
    for &(port, protocol) in endpoints {
        match bind(port, protocol) {
            Ok(Some(l)) => listeners.push(l),
            Ok(None) => {}
            Err(e) => {
                let _ = ready.send(Err(format!("bind {port}/{protocol:?}: {e}")));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(t) => PollFd::new(t.as_fd(), PollFlags::POLLIN),
                Listener::Udp(u) => PollFd::new(u.as_fd(), PollFlags::POLLIN),
            })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let readable: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for (l, ready) in listeners.iter().zip(readable) {
            if !ready {
                continue;
            }
            match l {
                // accept drains the backlog; closing answers nothing more
                Listener::Tcp(t) => while t.accept().is_ok() {},
                Listener::Udp(u) => {
                    while let Ok((n, peer)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], peer);
                    }
                }
            }
        }
    }
}
