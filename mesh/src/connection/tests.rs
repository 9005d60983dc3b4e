//! The protocol without sockets: two [`Context`]s and the frames between them.

use super::*;

const T0: u64 = 1_800_000_000_000;

fn name(s: &str) -> NodeName {
    NodeName::new(s).expect("name")
}

fn ctx_with(node: &str, secret: &[u8], config: SessionConfig) -> Context {
    let rng = SystemRandom::new();
    Context::new(
        name(node),
        Identity::ephemeral(&rng).expect("identity"),
        ClusterKeys::from_secret(secret).expect("secret"),
        config,
    )
}

fn ctx(node: &str) -> Context {
    ctx_with(
        node,
        b"the cluster secret, 32 bytes ok",
        SessionConfig::default(),
    )
}

/// The frame bodies among `outputs` (length prefix removed).
fn bodies(outputs: &[Output]) -> Vec<Vec<u8>> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit(f) => Some(f[wire::LEN_PREFIX..].to_vec()),
            _ => None,
        })
        .collect()
}

fn closed_reason(outputs: &[Output]) -> Option<CloseReason> {
    outputs.iter().find_map(|o| match o {
        Output::Closed(r) => Some(r.clone()),
        _ => None,
    })
}

/// Feeds every frame body of `from` into `conn`, collecting its outputs.
fn feed(
    mut conn: Connection,
    ctx: &Context,
    now: u64,
    from: &[Output],
) -> (Connection, Vec<Output>) {
    let mut all = Vec::new();
    for b in bodies(from) {
        let (c, out) = conn.step(ctx, now, Input::Frame(b));
        conn = c;
        all.extend(out);
    }
    (conn, all)
}

/// A full handshake between `a` (initiator) and `b`.
fn handshake(a: &Context, b: &Context) -> (Connection, Connection) {
    let (ca, hello) = Connection::initiate(a, b.node.clone(), T0);
    let (cb, reply) = feed(Connection::accept(T0), b, T0, &hello);
    let (ca, finish) = feed(ca, a, T0, &reply);
    assert!(finish.contains(&Output::Established(PeerInfo {
        name: b.node.clone(),
        identity: b.identity.public_key(),
        we_initiated: true,
    })));
    let (cb, done) = feed(cb, b, T0, &finish);
    assert_eq!(
        done,
        vec![Output::Established(PeerInfo {
            name: a.node.clone(),
            identity: a.identity.public_key(),
            we_initiated: false,
        })]
    );
    (ca, cb)
}

fn send(conn: Connection, ctx: &Context, now: u64, msg: &[u8]) -> (Connection, Vec<Output>) {
    conn.step(ctx, now, Input::Send(msg.to_vec()))
}

#[test]
fn both_sides_establish_and_messages_flow_both_ways() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let (ca, f1) = send(ca, &a, T0, b"from a");
    let (cb, got) = feed(cb, &b, T0, &f1);
    assert_eq!(got, vec![Output::Deliver(b"from a".to_vec())]);
    let (cb, f2) = send(cb, &b, T0, b"from b");
    let (_, got) = feed(ca, &a, T0, &f2);
    assert_eq!(got, vec![Output::Deliver(b"from b".to_vec())]);
    assert!(matches!(cb, Connection::Established(_)));
}

#[test]
fn sealed_frames_do_not_carry_the_plaintext() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, _cb) = handshake(&a, &b);
    let (_, f) = send(ca, &a, T0, b"very secret payload");
    let frame = &bodies(&f)[0];
    assert!(!frame.windows(6).any(|w| w == b"secret"));
}

#[test]
fn a_node_with_another_secret_is_refused_with_a_reason_on_both_sides() {
    let a = ctx_with(
        "node-a",
        b"wrong secret, by a typo",
        SessionConfig::default(),
    );
    let b = ctx("node-b");
    let (ca, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let (cb, refusal) = feed(Connection::accept(T0), &b, T0, &hello);
    assert_eq!(
        closed_reason(&refusal),
        Some(Misbehaviour::ClusterSecretMismatch.into())
    );
    assert!(matches!(cb, Connection::Closed(_)));
    let (ca, out) = feed(ca, &a, T0, &refusal);
    assert_eq!(
        closed_reason(&out),
        Some(CloseReason::Refused(RefuseReason::ClusterSecret))
    );
    assert_eq!(
        CloseReason::Refused(RefuseReason::ClusterSecret).label(),
        "refused_cluster_secret"
    );
    assert!(matches!(ca, Connection::Closed(_)));
}

#[test]
fn an_initiator_refuses_a_responder_without_the_secret() {
    // A responder that accepts anything (a fake) but cannot MAC its ServerHello.
    let a = ctx("node-a");
    let fake = ctx_with(
        "node-b",
        b"not the cluster secret",
        SessionConfig::default(),
    );
    let (ca, hello) = Connection::initiate(&a, fake.node.clone(), T0);
    // The fake answers with a ServerHello built under its own secret: replay our hello into
    // a responder that shares the initiator's MAC key is impossible, so build it by hand.
    let mut reply = Vec::new();
    let (_, eph) = fake.ephemeral().expect("eph");
    Hello {
        name: fake.node.clone(),
        identity: fake.identity.public_key(),
        ephemeral: eph,
        nonce: [9; 32],
        timestamp_ms: T0,
    }
    .encode(Kind::ServerHello, &mut reply);
    let client_hash = sha256(&[&bodies(&hello)[0]]);
    let sig = fake
        .identity
        .sign(&[SERVER_HELLO_SIG, &client_hash, &reply].concat());
    let mac = fake
        .cluster
        .mac(&[SERVER_HELLO_MAC, &client_hash, &reply, &sig]);
    reply.extend_from_slice(&sig);
    reply.extend_from_slice(&mac);
    let (_, out) = ca.step(&a, T0, Input::Frame(reply));
    assert_eq!(
        closed_reason(&out),
        Some(Misbehaviour::ClusterSecretMismatch.into())
    );
}

#[test]
fn a_server_hello_signed_by_another_key_is_refused() {
    // An insider with the secret who claims b's identity key but cannot sign with it.
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let mallory = ctx("node-b");
    let (ca, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let mut reply = Vec::new();
    let (_, eph) = mallory.ephemeral().expect("eph");
    Hello {
        name: b.node.clone(),
        identity: b.identity.public_key(),
        ephemeral: eph,
        nonce: [9; 32],
        timestamp_ms: T0,
    }
    .encode(Kind::ServerHello, &mut reply);
    let client_hash = sha256(&[&bodies(&hello)[0]]);
    let sig = mallory
        .identity
        .sign(&[SERVER_HELLO_SIG, &client_hash, &reply].concat());
    let mac = mallory
        .cluster
        .mac(&[SERVER_HELLO_MAC, &client_hash, &reply, &sig]);
    reply.extend_from_slice(&sig);
    reply.extend_from_slice(&mac);
    let (_, out) = ca.step(&a, T0, Input::Frame(reply));
    assert_eq!(closed_reason(&out), Some(Misbehaviour::BadSignature.into()));
}

#[test]
fn a_published_identity_key_must_be_presented() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    b.peers.set_key(name("node-a"), [7; 32]);
    let (_, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let (_, out) = feed(Connection::accept(T0), &b, T0, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(Misbehaviour::NotAdmitted(Admission::KeyMismatch(name("node-a"))).into())
    );
    assert_eq!(
        RefuseReason::decode(&bodies(&out)[0]),
        Ok(RefuseReason::UnknownPeer)
    );
}

#[test]
fn non_members_are_refused() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    b.peers.set_members([name("node-b"), name("node-c")]);
    let (_, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let (_, out) = feed(Connection::accept(T0), &b, T0, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(Misbehaviour::NotAdmitted(Admission::NotMember(name("node-a"))).into())
    );
}

#[test]
fn a_replayed_client_hello_is_refused() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (_, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let (c, _) = feed(Connection::accept(T0), &b, T0, &hello);
    assert!(matches!(c, Connection::AwaitClientFinish(_)));
    let (_, out) = feed(Connection::accept(T0 + 5), &b, T0 + 5, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(Misbehaviour::ReplayedHello.into())
    );
}

#[test]
fn a_hello_outside_the_time_window_is_refused_as_clock_skew() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (_, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let later = T0 + b.config.timestamp_window_ms + 1;
    let (_, out) = feed(Connection::accept(later), &b, later, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(
            Misbehaviour::ClockSkew {
                skew_ms: -(b.config.timestamp_window_ms as i64) - 1
            }
            .into()
        )
    );
    assert_eq!(
        RefuseReason::decode(&bodies(&out)[0]),
        Ok(RefuseReason::ClockSkew)
    );
}

#[test]
fn dialling_one_node_and_reaching_another_is_refused() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, hello) = Connection::initiate(&a, name("node-c"), T0);
    let (_, reply) = feed(Connection::accept(T0), &b, T0, &hello);
    let (_, out) = feed(ca, &a, T0, &reply);
    assert_eq!(
        closed_reason(&out),
        Some(
            Misbehaviour::WrongPeer {
                expected: name("node-c"),
                got: name("node-b")
            }
            .into()
        )
    );
}

#[test]
fn a_connection_to_ourselves_is_refused() {
    let a = ctx("node-a");
    let (_, hello) = Connection::initiate(&a, a.node.clone(), T0);
    let (_, out) = feed(Connection::accept(T0), &a, T0, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(Misbehaviour::SelfConnection.into())
    );
}

#[test]
fn a_tampered_sealed_frame_closes_the_connection() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let (_, f) = send(ca, &a, T0, b"payload");
    let mut body = bodies(&f)[0].clone();
    let last = body.len() - 1;
    body[last] ^= 1;
    let (cb, out) = cb.step(&b, T0, Input::Frame(body));
    assert_eq!(closed_reason(&out), Some(Misbehaviour::BadMac.into()));
    assert!(matches!(cb, Connection::Closed(_)));
}

#[test]
fn a_replayed_sealed_frame_closes_the_connection() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let (_, f) = send(ca, &a, T0, b"pay me once");
    let (cb, got) = feed(cb, &b, T0, &f);
    assert_eq!(got, vec![Output::Deliver(b"pay me once".to_vec())]);
    let (_, out) = feed(cb, &b, T0, &f);
    assert_eq!(
        closed_reason(&out),
        Some(
            Misbehaviour::Replay {
                epoch: 0,
                counter: 0,
                expected_epoch: 0,
                expected_counter: 1
            }
            .into()
        )
    );
}

#[test]
fn a_dropped_or_reordered_frame_closes_the_connection() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let (ca, _first) = send(ca, &a, T0, b"1");
    let (_, second) = send(ca, &a, T0, b"2");
    let (_, out) = feed(cb, &b, T0, &second);
    assert_eq!(closed_reason(&out).map(|r| r.label()), Some("replay"));
}

#[test]
fn a_handshake_message_after_establishment_closes_the_connection() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (_, cb) = handshake(&a, &b);
    let (_, hello) = Connection::initiate(&a, b.node.clone(), T0);
    let (_, out) = feed(cb, &b, T0, &hello);
    assert_eq!(
        closed_reason(&out),
        Some(
            Misbehaviour::Unexpected {
                state: "established",
                got: "ClientHello"
            }
            .into()
        )
    );
}

#[test]
fn a_sealed_frame_before_the_handshake_closes_the_connection() {
    let b = ctx("node-b");
    let (_, out) = Connection::accept(T0).step(&b, T0, Input::Frame(vec![4, 0, 0]));
    assert_eq!(
        closed_reason(&out).map(|r| r.label()),
        Some("unexpected_message")
    );
}

#[test]
fn a_handshake_that_stalls_times_out() {
    let b = ctx("node-b");
    let c = Connection::accept(T0);
    let (c, out) = c.step(&b, T0 + b.config.handshake_timeout_ms, Input::Tick);
    assert!(out.is_empty());
    let (_, out) = c.step(&b, T0 + b.config.handshake_timeout_ms + 1, Input::Tick);
    assert_eq!(closed_reason(&out), Some(CloseReason::HandshakeTimeout));
}

#[test]
fn messages_before_the_handshake_ends_are_reported_dropped() {
    let a = ctx("node-a");
    let (c, _) = Connection::initiate(&a, name("node-b"), T0);
    let (_, out) = send(c, &a, T0, b"early");
    assert_eq!(
        out,
        vec![Output::Dropped {
            len: 5,
            why: "handshake not finished"
        }]
    );
}

#[test]
fn an_orderly_close_reaches_the_peer() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let (_, out) = ca.step(&a, T0, Input::Close);
    assert_eq!(closed_reason(&out), Some(CloseReason::Local));
    let (_, got) = feed(cb, &b, T0, &out);
    assert_eq!(closed_reason(&got), Some(CloseReason::PeerClosed));
}

fn fast_rekey() -> SessionConfig {
    SessionConfig {
        rekey_interval_ms: 1_000,
        ..SessionConfig::default()
    }
}

#[test]
fn rekey_keeps_the_connection_and_changes_the_keys() {
    let a = ctx_with("node-a", b"the cluster secret, 32 bytes ok", fast_rekey());
    let b = ctx_with("node-b", b"the cluster secret, 32 bytes ok", fast_rekey());
    let (mut ca, mut cb) = handshake(&a, &b);
    let mut now = T0;
    for round in 1..=3u32 {
        now += 1_000;
        let (c, init) = ca.step(&a, now, Input::Tick);
        // Data the initiator sends after RekeyInit, still under the old key.
        let (c, in_flight) = send(c, &a, now, b"during rekey");
        let (c2, ack) = feed(cb, &b, now, &[init, in_flight].concat());
        assert!(ack.contains(&Output::Deliver(b"during rekey".to_vec())));
        // The responder already sends under the new key.
        let (c2, resp_data) = send(c2, &b, now, b"b after ack");
        let (c, done) = feed(c, &a, now, &[ack, resp_data].concat());
        assert!(done.contains(&Output::Rekeyed { epoch: round }), "{done:?}");
        assert!(done.contains(&Output::Deliver(b"b after ack".to_vec())));
        let (c2, switched) = feed(c2, &b, now, &done);
        assert_eq!(switched, vec![Output::Rekeyed { epoch: round }]);
        let (c, f) = send(c, &a, now, b"after");
        let (c2, got) = feed(c2, &b, now, &f);
        assert_eq!(got, vec![Output::Deliver(b"after".to_vec())]);
        assert_eq!(c.session().map(Session::epoch), Some(round));
        assert_eq!(c2.session().map(Session::epoch), Some(round));
        (ca, cb) = (c, c2);
    }
}

#[test]
fn a_frame_from_the_old_epoch_after_the_switch_is_a_replay() {
    let a = ctx_with("node-a", b"the cluster secret, 32 bytes ok", fast_rekey());
    let b = ctx_with("node-b", b"the cluster secret, 32 bytes ok", fast_rekey());
    let (ca, cb) = handshake(&a, &b);
    let now = T0 + 1_000;
    let (ca, old) = send(ca, &a, now, b"old");
    let (cb, _) = feed(cb, &b, now, &old);
    let (ca, init) = ca.step(&a, now, Input::Tick);
    let (cb, ack) = feed(cb, &b, now, &init);
    let (_, done) = feed(ca, &a, now, &ack);
    let (cb, _) = feed(cb, &b, now, &done);
    let (_, out) = feed(cb, &b, now, &old);
    assert_eq!(closed_reason(&out).map(|r| r.label()), Some("replay"));
}

#[test]
fn a_rekey_that_is_never_answered_times_out() {
    let a = ctx_with("node-a", b"the cluster secret, 32 bytes ok", fast_rekey());
    let b = ctx_with("node-b", b"the cluster secret, 32 bytes ok", fast_rekey());
    let (ca, _cb) = handshake(&a, &b);
    let (ca, init) = ca.step(&a, T0 + 1_000, Input::Tick);
    assert_eq!(bodies(&init).len(), 1);
    let (_, out) = ca.step(&a, T0 + 1_001 + a.config.handshake_timeout_ms, Input::Tick);
    assert_eq!(closed_reason(&out), Some(CloseReason::RekeyTimeout));
}

#[test]
fn only_the_initiator_may_start_a_rekey() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    // b (the responder) is made to send a RekeyInit by hand.
    let Connection::Established(mut s) = cb else {
        panic!("established")
    };
    let f = s.seal(&Inner::RekeyInit([5; 32]), T0).expect("seal");
    let (_, out) = ca.step(&a, T0, Input::Frame(f[wire::LEN_PREFIX..].to_vec()));
    assert_eq!(
        closed_reason(&out),
        Some(
            Misbehaviour::Unexpected {
                state: "established",
                got: "RekeyInit"
            }
            .into()
        )
    );
}

#[test]
fn keepalives_flow_and_a_silent_peer_is_closed() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, cb) = handshake(&a, &b);
    let t = T0 + a.config.keepalive_ms;
    let (ca, ka) = ca.step(&a, t, Input::Tick);
    assert_eq!(bodies(&ka).len(), 1);
    let (_, got) = feed(cb, &b, t, &ka);
    assert!(got.is_empty(), "keepalives deliver nothing");
    let (_, out) = ca.step(&a, T0 + a.config.dead_after_ms + 1, Input::Tick);
    assert_eq!(closed_reason(&out), Some(CloseReason::PeerSilent));
}

#[test]
fn oversized_application_messages_are_dropped_not_sent() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let (ca, _) = handshake(&a, &b);
    let big = vec![0; a.config.max_payload() + 1];
    let (ca, out) = send(ca, &a, T0, &big);
    assert_eq!(
        out,
        vec![Output::Dropped {
            len: big.len(),
            why: "larger than a frame"
        }]
    );
    let (_, out) = send(ca, &a, T0, &big[1..]);
    assert!(bodies(&out)[0].len() <= a.config.max_frame);
}

/// xorshift64*, for reproducible garbage.
fn noise(seed: &mut u64) -> u64 {
    *seed ^= *seed >> 12;
    *seed ^= *seed << 25;
    *seed ^= *seed >> 27;
    seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn garbage_in_any_state_closes_without_panicking() {
    let (a, b) = (ctx("node-a"), ctx("node-b"));
    let mut seed = 0x5eed_u64;
    for i in 0..600 {
        let len = (noise(&mut seed) % 200) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| noise(&mut seed) as u8).collect();
        if let Some(k) = body.first_mut() {
            *k = 1 + (*k % 5); // mostly known kinds, so parsing goes deeper
        }
        let conn = match i % 3 {
            0 => Connection::accept(T0),
            1 => Connection::initiate(&a, b.node.clone(), T0).0,
            _ => handshake(&a, &b).1,
        };
        let (c, out) = conn.step(&b, T0, Input::Frame(body.clone()));
        assert!(
            matches!(c, Connection::Closed(_)),
            "state {i}: {body:?} left {}",
            c.state()
        );
        assert!(closed_reason(&out).is_some());
    }
}
