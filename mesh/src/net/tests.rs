//! Real sockets on 127.0.0.1: nodes, and a fake peer that speaks the protocol through the pure
//! state machine so that it can tamper with what it sends.

use super::*;
use crate::cluster::ClusterKeys;
use crate::connection::SessionConfig;
use crate::identity::Identity;
use crate::wire::{self, Kind};
use ring::rand::SystemRandom;

const SECRET: &[u8] = b"loopback test secret, 32 bytes.";
const WAIT: Duration = Duration::from_secs(10);

fn name(s: &str) -> NodeName {
    NodeName::new(s).expect("name")
}

fn context(node: &str, secret: &[u8], session: SessionConfig) -> Context {
    Context::new(
        name(node),
        Identity::ephemeral(&SystemRandom::new()).expect("identity"),
        ClusterKeys::from_secret(secret).expect("secret"),
        session,
    )
}

struct TestNode {
    node: Arc<MeshNode>,
    events: mpsc::Receiver<MeshEvent>,
    metrics: Arc<MeshMetrics>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn start(node: &str, secret: &[u8], session: SessionConfig, net: NetConfig) -> TestNode {
    let metrics = Arc::new(MeshMetrics::default());
    let (mesh, events) = MeshNode::new(context(node, secret, session), net, metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = watch::channel(false);
    tokio::spawn(mesh.clone().serve(listener, rx));
    TestNode {
        node: mesh,
        events,
        metrics,
        addr,
        _stop: stop,
    }
}

async fn default_node(node: &str) -> TestNode {
    start(node, SECRET, SessionConfig::default(), NetConfig::default()).await
}

async fn next_event(rx: &mut mpsc::Receiver<MeshEvent>) -> MeshEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

async fn expect_up(rx: &mut mpsc::Receiver<MeshEvent>) -> (PeerInfo, PeerLink) {
    match next_event(rx).await {
        MeshEvent::Up { peer, link } => (peer, link),
        other => panic!("expected Up, got {other:?}"),
    }
}

async fn expect_down(rx: &mut mpsc::Receiver<MeshEvent>) -> CloseReason {
    loop {
        if let MeshEvent::Down { reason, .. } = next_event(rx).await {
            return reason;
        }
    }
}

/// A peer driven by hand through [`Connection::step`].
struct FakePeer {
    ctx: Context,
    stream: TcpStream,
    conn: Option<Connection>,
    decoder: FrameDecoder,
}

impl FakePeer {
    async fn handshake(ctx: Context, addr: SocketAddr, peer: NodeName) -> FakePeer {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (conn, out) = Connection::initiate(&ctx, peer, now_ms());
        let mut p = FakePeer {
            decoder: FrameDecoder::new(ctx.config.max_frame),
            ctx,
            stream,
            conn: Some(conn),
        };
        p.write_outputs(&out).await;
        let body = p.read_frame().await;
        let (conn, out) = p
            .conn
            .take()
            .expect("conn")
            .step(&p.ctx, now_ms(), Input::Frame(body));
        assert!(matches!(conn, Connection::Established(_)), "{out:?}");
        p.conn = Some(conn);
        p.write_outputs(&out).await;
        p
    }

    async fn write_outputs(&mut self, out: &[Output]) {
        for o in out {
            if let Output::Transmit(b) = o {
                self.stream.write_all(b).await.expect("write");
            }
        }
    }

    async fn read_frame(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("valid frame") {
                return f;
            }
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("read in time")
                .expect("read");
            assert!(n > 0, "closed by the node");
            self.decoder.push(&buf[..n]);
        }
    }

    /// A sealed data frame (with its length prefix), as the real peer would send it.
    fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let (conn, out) = self.conn.take().expect("conn").step(
            &self.ctx,
            now_ms(),
            Input::Send(payload.to_vec()),
        );
        self.conn = Some(conn);
        match out.as_slice() {
            [Output::Transmit(f)] => f.clone(),
            other => panic!("expected one frame, got {other:?}"),
        }
    }
}

/// Whether the other end closes `stream` within [`WAIT`].
async fn closed_by_node(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test]
async fn two_nodes_with_the_secret_connect_and_exchange_messages() {
    let mut a = default_node("node-a").await;
    let mut b = default_node("node-b").await;
    let task = a.node.connect(name("node-b"), b.addr).await.expect("dial");
    let (peer_of_a, link_a) = expect_up(&mut a.events).await;
    let (peer_of_b, link_b) = expect_up(&mut b.events).await;
    assert_eq!(peer_of_a.name, name("node-b"));
    assert_eq!(peer_of_a.identity, b.node.context().identity.public_key());
    assert_eq!(peer_of_b.name, name("node-a"));
    assert!(link_a.send(b"hello b".to_vec()).await);
    match next_event(&mut b.events).await {
        MeshEvent::Message { peer, payload } => {
            assert_eq!((peer, payload), (name("node-a"), b"hello b".to_vec()))
        }
        other => panic!("{other:?}"),
    }
    assert!(link_b.send(b"hello a".to_vec()).await);
    match next_event(&mut a.events).await {
        MeshEvent::Message { payload, .. } => assert_eq!(payload, b"hello a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.metrics.established.load(Ordering::Relaxed), 1);
    assert!(
        a.metrics
            .render()
            .contains("weft_mesh_connections{state=\"established\"} 1")
    );
    let us = a.metrics.handshake_micros.load(Ordering::Relaxed);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!("handshake (initiator, after TCP connect, loopback, {build} build): {us} µs");

    link_a.close().await;
    assert_eq!(
        tokio::time::timeout(WAIT, task)
            .await
            .expect("ends")
            .expect("task"),
        CloseReason::Local
    );
    assert_eq!(expect_down(&mut b.events).await, CloseReason::PeerClosed);
    assert_eq!(b.metrics.terminations_of("peer_closed"), 1);
    assert_eq!(b.metrics.established.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_node_with_the_wrong_secret_is_refused_and_counted() {
    let a = start(
        "node-a",
        b"a different secret",
        SessionConfig::default(),
        NetConfig::default(),
    )
    .await;
    let mut b = default_node("node-b").await;
    let task = a.node.connect(name("node-b"), b.addr).await.expect("dial");
    let reason = tokio::time::timeout(WAIT, task)
        .await
        .expect("ends")
        .expect("task");
    assert_eq!(reason, CloseReason::Refused(RefuseReason::ClusterSecret));
    assert_eq!(
        expect_down(&mut b.events).await,
        CloseReason::Misbehaviour(Misbehaviour::ClusterSecretMismatch)
    );
    assert_eq!(
        b.metrics.handshake_failures_of("cluster_secret_mismatch"),
        1
    );
    assert_eq!(a.metrics.handshake_failures_of("refused_cluster_secret"), 1);
    assert_eq!(b.metrics.established.load(Ordering::Relaxed), 0);
    assert!(
        b.metrics
            .render()
            .contains("weft_mesh_handshake_failures_total{reason=\"cluster_secret_mismatch\"} 1")
    );
}

#[tokio::test]
async fn a_tampered_frame_disconnects_the_peer() {
    let mut b = default_node("node-b").await;
    let mut fake = FakePeer::handshake(
        context("node-a", SECRET, SessionConfig::default()),
        b.addr,
        name("node-b"),
    )
    .await;
    expect_up(&mut b.events).await;
    let mut frame = fake.seal(b"tamper with me");
    let last = frame.len() - 1;
    frame[last] ^= 0x80;
    fake.stream.write_all(&frame).await.expect("write");
    assert_eq!(
        expect_down(&mut b.events).await,
        CloseReason::Misbehaviour(Misbehaviour::BadMac)
    );
    assert!(closed_by_node(&mut fake.stream).await);
    assert_eq!(b.metrics.violations_of("bad_mac"), 1);
    assert_eq!(b.metrics.terminations_of("bad_mac"), 1);
}

#[tokio::test]
async fn a_replayed_frame_disconnects_the_peer() {
    let mut b = default_node("node-b").await;
    let mut fake = FakePeer::handshake(
        context("node-a", SECRET, SessionConfig::default()),
        b.addr,
        name("node-b"),
    )
    .await;
    expect_up(&mut b.events).await;
    let frame = fake.seal(b"once");
    fake.stream.write_all(&frame).await.expect("write");
    match next_event(&mut b.events).await {
        MeshEvent::Message { payload, .. } => assert_eq!(payload, b"once"),
        other => panic!("{other:?}"),
    }
    fake.stream.write_all(&frame).await.expect("write");
    assert_eq!(expect_down(&mut b.events).await.label(), "replay");
    assert!(closed_by_node(&mut fake.stream).await);
    assert_eq!(b.metrics.violations_of("replay"), 1);
}

#[tokio::test]
async fn an_oversized_length_disconnects_without_waiting_for_the_bytes() {
    let mut b = default_node("node-b").await;
    // Before any handshake...
    let mut raw = TcpStream::connect(b.addr).await.expect("connect");
    raw.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
    assert!(closed_by_node(&mut raw).await);
    assert_eq!(expect_down(&mut b.events).await.label(), "oversize");
    // ... and after one.
    let mut fake = FakePeer::handshake(
        context("node-a", SECRET, SessionConfig::default()),
        b.addr,
        name("node-b"),
    )
    .await;
    expect_up(&mut b.events).await;
    let too_big = (b.node.context().config.max_frame as u32 + 1).to_be_bytes();
    fake.stream.write_all(&too_big).await.expect("write");
    assert_eq!(expect_down(&mut b.events).await.label(), "oversize");
    assert!(closed_by_node(&mut fake.stream).await);
    assert_eq!(b.metrics.violations_of("oversize"), 2);
}

#[tokio::test]
async fn malformed_hellos_are_refused_and_the_node_keeps_serving() {
    let mut a = default_node("node-a").await;
    let mut b = default_node("node-b").await;
    for junk in [
        vec![1u8, 2, 3],
        vec![Kind::ClientHello as u8; 40],
        vec![Kind::Sealed as u8; 30],
        vec![99],
    ] {
        let mut raw = TcpStream::connect(b.addr).await.expect("connect");
        raw.write_all(&wire::frame(&junk)).await.expect("write");
        assert!(closed_by_node(&mut raw).await, "{junk:?}");
        expect_down(&mut b.events).await;
    }
    a.node.connect(name("node-b"), b.addr).await.expect("dial");
    expect_up(&mut a.events).await;
    expect_up(&mut b.events).await;
}

#[tokio::test]
async fn rekeys_keep_the_connection_up() {
    let session = SessionConfig {
        rekey_interval_ms: 200,
        ..SessionConfig::default()
    };
    let net = NetConfig {
        tick: Duration::from_millis(50),
        ..NetConfig::default()
    };
    let mut a = start("node-a", SECRET, session.clone(), net.clone()).await;
    let mut b = start("node-b", SECRET, session, net).await;
    a.node.connect(name("node-b"), b.addr).await.expect("dial");
    let (_, link) = expect_up(&mut a.events).await;
    expect_up(&mut b.events).await;
    for i in 0..30u32 {
        assert!(link.send(i.to_be_bytes().to_vec()).await);
        match next_event(&mut b.events).await {
            MeshEvent::Message { payload, .. } => assert_eq!(payload, i.to_be_bytes()),
            other => panic!("message {i}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let rekeys = a.metrics.rekeys.load(Ordering::Relaxed);
    assert!(rekeys >= 3, "only {rekeys} rekeys in 1.2 s at 200 ms");
    assert!(b.metrics.rekeys.load(Ordering::Relaxed) >= 3);
    assert_eq!(a.metrics.established.load(Ordering::Relaxed), 1);
    assert_eq!(b.metrics.established.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn handshakes_beyond_the_per_peer_rate_are_refused() {
    let net = NetConfig {
        handshakes_per_minute: NonZeroU32::new(1).expect("1"),
        handshake_burst: NonZeroU32::new(2).expect("2"),
        ..NetConfig::default()
    };
    let a = start("node-a", SECRET, SessionConfig::default(), net.clone()).await;
    let b = start("node-b", SECRET, SessionConfig::default(), net).await;
    // Dials: two pass, the third is refused locally.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(
            a.node
                .connect(name("node-b"), b.addr)
                .await
                .expect("within burst"),
        );
    }
    match a.node.connect(name("node-b"), b.addr).await {
        Err(DialError::RateLimited { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(1))
        }
        other => panic!("expected rate limit, got {other:?}"),
    }
    // Inbound: 127.0.0.1 already used its burst on those two; more are closed unread.
    for _ in 0..3 {
        let mut raw = TcpStream::connect(b.addr).await.expect("connect");
        assert!(closed_by_node(&mut raw).await);
    }
    assert_eq!(b.metrics.rate_limited.load(Ordering::Relaxed), 3);
    assert_eq!(a.metrics.rate_limited.load(Ordering::Relaxed), 1);
}
