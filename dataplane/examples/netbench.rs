//! The dataplane benchmark's measuring tool (driven by `conformance/lab/bench.sh`, root, inside
//! the lab's network namespaces):
//!
//! ```text
//! netbench serve PORT                         accept and close, forever (IPv4 and IPv6)
//! netbench connect ADDR PORT SECONDS          connect/close loop: prints connections per second
//! netbench cni-add PLUGIN CONF LIST           exec PLUGIN (CNI ADD) per line of LIST
//!                                             ("ns name uid netns"), timed like a runtime sees it
//! ```
//!
//! `connect` closes each connection with an RST (`SO_LINGER` 0): no TIME_WAIT, so the loop
//! never runs out of ports; every iteration is one full handshake through both nodes' forward
//! hooks. `cni-add` prints one line per pod and a summary `p50 … p99 … max …` in ms.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

fn serve(port: u16) -> std::io::Result<()> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(4096)?;
    let listener: TcpListener = sock.into();
    let mut threads = Vec::new();
    for _ in 0..2 {
        let l = listener.try_clone()?;
        threads.push(std::thread::spawn(move || {
            loop {
                // Accepted and dropped: the client's RST may already have closed it.
                let _ = l.accept();
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn connect(addr: SocketAddr, seconds: f64) -> std::io::Result<()> {
    let domain = Domain::for_address(addr);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    while Instant::now() < deadline {
        let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_linger(Some(Duration::ZERO))?;
        match sock.connect_timeout(&addr.into(), Duration::from_secs(1)) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
        drop(sock);
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{:.0} {ok} {failed}", ok as f64 / secs);
    if failed > 0 {
        eprintln!("netbench: {failed} connects failed");
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn cni_add(plugin: &str, conf: &str, list: &str) -> std::io::Result<bool> {
    let conf = std::fs::read(conf)?;
    let list = std::fs::read_to_string(list)?;
    let mut times = Vec::new();
    let mut failures = 0;
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ns, name, uid, netns] = f[..] else {
            eprintln!("netbench: bad line {line:?}");
            return Ok(false);
        };
        let started = Instant::now();
        let mut child = Command::new(plugin)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("bench-{ns}-{name}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/nonexistent")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(&conf)?;
        let out = child.wait_with_output()?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if out.status.success() {
            println!("{ns}/{name} {ms:.2} ms");
            times.push(ms);
        } else {
            failures += 1;
            println!(
                "{ns}/{name} FAILED after {ms:.2} ms: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    times.sort_by(f64::total_cmp);
    if times.is_empty() {
        println!("summary: no ADD succeeded, {failures} failed");
        return Ok(false);
    }
    println!(
        "summary: n {} failed {failures} p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms",
        times.len(),
        percentile(&times, 50.0),
        percentile(&times, 90.0),
        percentile(&times, 99.0),
        times[times.len() - 1]
    );
    Ok(failures == 0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args[..] {
        ["serve", port] => serve(port.parse().expect("PORT")).map(|()| true),
        ["connect", addr, port, seconds] => {
            let ip: std::net::IpAddr = addr.parse().expect("ADDR");
            let addr = SocketAddr::new(ip, port.parse().expect("PORT"));
            connect(addr, seconds.parse().expect("SECONDS")).map(|()| true)
        }
        ["cni-add", plugin, conf, list] => cni_add(plugin, conf, list),
        _ => {
            eprintln!(
                "usage: netbench serve PORT | connect ADDR PORT SECONDS | cni-add PLUGIN CONF LIST"
            );
            std::process::exit(2);
        }
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("netbench: {e}");
            std::process::exit(1);
        }
    }
}
