//! IPAM tests: unit behaviour on temp dirs with a fake clock, plus a multi-process stress
//! test that kills workers with SIGKILL at random points. Kept in its own file because the
//! stress harness (worker re-exec, kill loop, verification) is as long as the module.

use super::*;
use std::process::{Child, Command};
use std::sync::Arc;

fn key(c: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: c.into(),
        ifname: "eth0".into(),
    }
}

fn pod(name: &str) -> PodRef {
    PodRef {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-ipam-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cidrs(list: &[&str]) -> PodCidrs {
    let nets: Vec<IpNet> = list.iter().map(|s| s.parse().expect("cidr")).collect();
    PodCidrs::from_list(&nets).expect("cidrs")
}

fn open(dir: &Path, c: PodCidrs, clock: Arc<FakeClock>, cooldown: Duration) -> Ipam {
    Ipam::open(
        IpamConfig {
            dir: dir.to_owned(),
            cidrs: c,
            cooldown,
        },
        clock,
    )
    .expect("open")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn dual_stack_allocation_skips_network_tunnel_and_last_address() {
    let tmp = TempDir::new("dual");
    let clock = Arc::new(FakeClock::new(1_000));
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/29", "fd00:10:244:1::/125"]),
        clock,
        DEFAULT_COOLDOWN,
    );
    let mut v4 = Vec::new();
    for i in 0..5 {
        let a = ipam
            .allocate(&key(&format!("c{i}")), &pod("p"), &[])
            .expect("alloc");
        assert_eq!(a.ips.len(), 2, "dual-stack: {a:?}");
        v4.push(a.ips[0]);
        assert!(a.ips[1].is_ipv6());
    }
    let want: Vec<IpAddr> = (2..=6).map(|h| ip(&format!("10.244.1.{h}"))).collect();
    assert_eq!(v4, want);
    let err = ipam.allocate(&key("c9"), &pod("p"), &[]).expect_err("full");
    assert!(
        matches!(err, IpamError::Exhausted { cooling: 0, .. }),
        "{err}"
    );
    assert_eq!(
        tunnel_address("10.244.1.0/29".parse().expect("net")),
        ip("10.244.1.1")
    );
    assert_eq!(
        tunnel_address("fd00:10:244:1::/64".parse().expect("net")),
        ip("fd00:10:244:1::1")
    );
}

#[test]
fn allocate_for_an_existing_key_returns_the_same_addresses() {
    let tmp = TempDir::new("idem");
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        Arc::new(FakeClock::new(0)),
        DEFAULT_COOLDOWN,
    );
    let a = ipam.allocate(&key("c1"), &pod("p"), &[]).expect("alloc");
    let b = ipam.allocate(&key("c1"), &pod("p"), &[]).expect("again");
    assert_eq!(a, b);
    assert_eq!(ipam.list().expect("list").len(), 1);
    // Another handle (another process) sees the same state.
    let other = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        Arc::new(FakeClock::new(0)),
        DEFAULT_COOLDOWN,
    );
    assert_eq!(other.get(&key("c1")).expect("get"), Some(a));
}

#[test]
fn a_released_address_rests_then_the_least_recently_released_comes_back_first() {
    let tmp = TempDir::new("cool");
    let clock = Arc::new(FakeClock::new(0));
    // /29: five usable addresses .2 … .6
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/29"]),
        clock.clone(),
        DEFAULT_COOLDOWN,
    );
    for i in 0..5 {
        ipam.allocate(&key(&format!("c{i}")), &pod("p"), &[])
            .expect("alloc");
    }
    // Release .4 first, then .2 ten seconds later.
    assert_eq!(
        ipam.release(&key("c2")).expect("rel").expect("had").ips,
        vec![ip("10.244.1.4")]
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        ipam.release(&key("c0")).expect("rel").expect("had").ips,
        vec![ip("10.244.1.2")]
    );
    assert!(ipam.release(&key("c0")).expect("idempotent").is_none());
    // Both rest: nothing to give, but retrying later can work.
    let err = ipam
        .allocate(&key("n1"), &pod("p"), &[])
        .expect_err("resting");
    assert!(
        matches!(err, IpamError::Exhausted { cooling: 2, .. }),
        "{err}"
    );
    clock.advance(Duration::from_secs(51)); // .4 rested 61 s, .2 51 s
    assert_eq!(
        ipam.allocate(&key("n1"), &pod("p"), &[])
            .expect("alloc")
            .ips,
        vec![ip("10.244.1.4")]
    );
    assert!(ipam.allocate(&key("n2"), &pod("p"), &[]).is_err());
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        ipam.allocate(&key("n2"), &pod("p"), &[])
            .expect("alloc")
            .ips,
        vec![ip("10.244.1.2")]
    );
}

#[test]
fn fresh_addresses_are_preferred_over_released_ones() {
    let tmp = TempDir::new("fresh");
    let clock = Arc::new(FakeClock::new(0));
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        clock.clone(),
        DEFAULT_COOLDOWN,
    );
    let a = ipam.allocate(&key("a"), &pod("p"), &[]).expect("alloc");
    ipam.release(&key("a")).expect("rel");
    clock.advance(Duration::from_secs(3600));
    let b = ipam.allocate(&key("b"), &pod("p"), &[]).expect("alloc");
    assert_ne!(a.ips, b.ips);
}

#[test]
fn pinned_addresses_must_be_inside_unreserved_and_free() {
    let tmp = TempDir::new("pin");
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24", "fd00:10:244:1::/64"]),
        Arc::new(FakeClock::new(0)),
        DEFAULT_COOLDOWN,
    );
    let a = ipam
        .allocate(&key("a"), &pod("a"), &[ip("10.244.1.77")])
        .expect("pinned v4");
    assert_eq!(a.ips[0], ip("10.244.1.77"));
    assert!(a.ips[1].is_ipv6(), "the other family is allocated as usual");
    for (bad, why) in [
        ("10.244.2.5", "outside"),
        ("10.244.1.0", "reserved"),
        ("10.244.1.1", "reserved"),
        ("10.244.1.255", "reserved"),
        ("10.244.1.77", "in use by a/eth0"),
    ] {
        let err = ipam
            .allocate(&key("b"), &pod("b"), &[ip(bad)])
            .expect_err(bad);
        assert!(matches!(err, IpamError::PinnedRefused { .. }), "{err}");
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    let err = ipam
        .allocate(&key("b"), &pod("b"), &[ip("10.244.1.5"), ip("10.244.1.6")])
        .expect_err("two v4");
    assert!(err.to_string().contains("more than one"), "{err}");
    assert_eq!(
        ipam.list().expect("list").len(),
        1,
        "refusals allocate nothing"
    );
    let v4only = TempDir::new("pin4");
    let ipam4 = open(
        &v4only.0,
        cidrs(&["10.244.1.0/24"]),
        Arc::new(FakeClock::new(0)),
        DEFAULT_COOLDOWN,
    );
    let err = ipam4
        .allocate(&key("c"), &pod("c"), &[ip("fd00::5")])
        .expect_err("no v6");
    assert!(
        err.to_string().contains("no podCIDR of its family"),
        "{err}"
    );
}

#[test]
fn a_podcidr_change_is_reported_with_old_and_new() {
    let tmp = TempDir::new("change");
    let clock = Arc::new(FakeClock::new(0));
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        clock.clone(),
        DEFAULT_COOLDOWN,
    );
    ipam.allocate(&key("a"), &pod("a"), &[]).expect("alloc");
    let err = Ipam::open(
        IpamConfig {
            dir: tmp.0.clone(),
            cidrs: cidrs(&["10.244.7.0/24"]),
            cooldown: DEFAULT_COOLDOWN,
        },
        clock,
    )
    .expect_err("changed");
    let text = err.to_string();
    assert!(matches!(err, IpamError::PodCidrChanged { .. }));
    assert!(
        text.contains("10.244.1.0/24") && text.contains("10.244.7.0/24"),
        "{text}"
    );
}

#[test]
fn gc_frees_only_invalid_attachments_older_than_the_grace() {
    let tmp = TempDir::new("gc");
    let clock = Arc::new(FakeClock::new(0));
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        clock.clone(),
        DEFAULT_COOLDOWN,
    );
    ipam.allocate(&key("keep"), &pod("k"), &[]).expect("alloc");
    ipam.allocate(&key("old"), &pod("o"), &[]).expect("alloc");
    clock.advance(Duration::from_secs(30));
    ipam.allocate(&key("young"), &pod("y"), &[]).expect("alloc");
    let valid: HashSet<AttachmentKey> = [key("keep")].into_iter().collect();
    let gone = ipam.gc(&valid, Duration::from_secs(10)).expect("gc");
    assert_eq!(
        gone.iter().map(|a| a.key.clone()).collect::<Vec<_>>(),
        vec![key("old")]
    );
    let left: Vec<AttachmentKey> = ipam
        .list()
        .expect("list")
        .into_iter()
        .map(|a| a.key)
        .collect();
    assert_eq!(left, vec![key("keep"), key("young")]);
}

#[test]
fn api_cleanup_frees_only_old_allocations_of_pods_the_api_no_longer_has() {
    let tmp = TempDir::new("uid");
    let clock = Arc::new(FakeClock::new(0));
    let ipam = open(
        &tmp.0,
        cidrs(&["10.244.1.0/24"]),
        clock.clone(),
        DEFAULT_COOLDOWN,
    );
    ipam.allocate(&key("live"), &pod("live"), &[])
        .expect("alloc");
    ipam.allocate(&key("deleted"), &pod("deleted"), &[])
        .expect("alloc");
    let no_uid = PodRef {
        namespace: "ns".into(),
        name: "legacy".into(),
        uid: String::new(),
    };
    ipam.allocate(&key("legacy"), &no_uid, &[]).expect("alloc");
    clock.advance(Duration::from_secs(600));
    ipam.allocate(&key("fresh"), &pod("fresh"), &[])
        .expect("alloc"); // not watched yet
    let live: HashSet<String> = ["uid-live".to_string()].into_iter().collect();
    let gone = ipam
        .release_deleted_pods(&live, Duration::from_secs(300))
        .expect("cleanup");
    assert_eq!(
        gone.iter().map(|a| a.key.clone()).collect::<Vec<_>>(),
        vec![key("deleted")]
    );
    assert_eq!(ipam.list().expect("list").len(), 3);
}

#[test]
fn threads_with_their_own_handles_never_share_an_address() {
    let tmp = TempDir::new("threads");
    let c = cidrs(&["10.244.1.0/24"]);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let dir = tmp.0.clone();
            std::thread::spawn(move || {
                let ipam = open(&dir, c, Arc::new(FakeClock::new(0)), Duration::ZERO);
                let mut got = Vec::new();
                for i in 0..40 {
                    got.extend(
                        ipam.allocate(&key(&format!("t{t}-{i}")), &pod("p"), &[])
                            .expect("alloc")
                            .ips,
                    );
                }
                got
            })
        })
        .collect();
    let mut all: Vec<IpAddr> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "duplicate addresses handed out");
}

// ---------------------------------------------------------------------------------------
// Multi-process stress: workers (this test binary re-exec'd) allocate and release in a
// loop on one state dir while the parent SIGKILLs them at random points.

const WORKER_ENV: &str = "WEFT_IPAM_STRESS_WORKER";
const STRESS_CIDR: &str = "10.244.9.0/27"; // 29 usable addresses: constant reuse
const TOTAL_CYCLES: usize = 10_000;
const WORKERS: usize = 4;

/// Not a test on its own: the body the stress test's workers run (it returns at once
/// unless the worker environment is set).
#[test]
fn stress_worker_entry() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let (dir, id) = spec.split_once('|').expect("dir|id");
    let dir = PathBuf::from(dir);
    let ipam = Ipam::open(
        IpamConfig {
            dir: dir.clone(),
            cidrs: cidrs(&[STRESS_CIDR]),
            cooldown: Duration::ZERO,
        },
        Arc::new(SystemClock),
    )
    .expect("open");
    let claims = dir.join("claims");
    let mut progress = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("progress-{id}")))
        .expect("progress");
    for n in 0.. {
        let k = key(&format!("w{id}-{n}"));
        let a = match ipam.allocate(&k, &pod("w"), &[]) {
            Ok(a) => a,
            Err(IpamError::Exhausted { .. }) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => panic!("allocate: {e}"),
        };
        // Claim each address exclusively, content and all in one step (hard link fails if
        // the claim exists): a second live holder is a duplicate.
        for ip in &a.ips {
            let claim = claims.join(ip.to_string());
            let tmp = dir.join("claims-tmp").join(id);
            std::fs::write(&tmp, k.to_string()).expect("claim tmp");
            if std::fs::hard_link(&tmp, &claim).is_err() {
                let holder = std::fs::read_to_string(&claim).unwrap_or_default();
                let mut dups = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("duplicates"))
                    .expect("dups");
                let _ = writeln!(dups, "{ip} given to {k} while held by {holder}");
            }
        }
        // Claim released before the address is; a kill in between leaks an allocation
        // (GC's job), never a claim without an allocation.
        for ip in &a.ips {
            let _ = std::fs::remove_file(claims.join(ip.to_string()));
        }
        ipam.release(&k).expect("release");
        progress.write_all(b".").expect("progress");
    }
}

/// `w12-345/eth0` → 12.
fn worker_of(key: &str) -> usize {
    key.strip_prefix('w')
        .and_then(|rest| rest.split('-').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or(usize::MAX)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Kills and reaps the workers still running when the test ends, even on panic.
struct Workers(Vec<Child>);
impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn progress_total(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("progress-"))
        .map(|e| e.metadata().map(|m| m.len() as usize).unwrap_or(0))
        .sum()
}

#[test]
fn ten_thousand_cycles_by_processes_killed_at_random_points_give_no_duplicates_or_leaks() {
    let tmp = TempDir::new("stress");
    std::fs::create_dir_all(tmp.0.join("claims")).expect("claims");
    std::fs::create_dir_all(tmp.0.join("claims-tmp")).expect("claims-tmp");
    let seed = std::env::var("WEFT_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemClock.now_ms() | 1);
    eprintln!("stress seed {seed} (WEFT_STRESS_SEED to replay the kill schedule)");
    let mut rng = Rng(seed);
    let exe = std::env::current_exe().expect("exe");
    let spawn = |id: usize| -> Child {
        Command::new(&exe)
            .args([
                "--exact",
                "ipam::tests::stress_worker_entry",
                "--test-threads=1",
                "-q",
            ])
            .env(WORKER_ENV, format!("{}|{id}", tmp.0.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn worker")
    };
    let mut next_id = 0;
    let mut workers = Workers(Vec::new());
    let mut ids = Vec::new();
    let mut dead = HashSet::new();
    for _ in 0..WORKERS {
        workers.0.push(spawn(next_id));
        ids.push(next_id);
        next_id += 1;
    }
    let gc_ipam = Ipam::open(
        IpamConfig {
            dir: tmp.0.clone(),
            cidrs: cidrs(&[STRESS_CIDR]),
            cooldown: Duration::ZERO,
        },
        Arc::new(SystemClock),
    )
    .expect("open");
    let started = std::time::Instant::now();
    let mut kills = 0;
    while progress_total(&tmp.0) < TOTAL_CYCLES {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "stress test too slow"
        );
        std::thread::sleep(Duration::from_millis(rng.next() % 200));
        let victim = (rng.next() % WORKERS as u64) as usize;
        let _ = workers.0[victim].kill(); // SIGKILL
        let _ = workers.0[victim].wait();
        kills += 1;
        dead.insert(ids[victim]);
        ids[victim] = next_id;
        workers.0[victim] = spawn(next_id);
        next_id += 1;
        // Play the runtime: the dead worker's containers are gone (their claims with them),
        // so GC with every other attachment valid. The grace keeps allocations made by live
        // workers after the list was taken.
        for entry in std::fs::read_dir(tmp.0.join("claims")).expect("claims") {
            let path = entry.expect("entry").path();
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            if dead.contains(&worker_of(&holder)) {
                let _ = std::fs::remove_file(&path);
            }
        }
        let valid: HashSet<AttachmentKey> = gc_ipam
            .list()
            .expect("list")
            .into_iter()
            .map(|a| a.key)
            .filter(|k| !dead.contains(&worker_of(&k.to_string())))
            .collect();
        gc_ipam.gc(&valid, Duration::from_secs(2)).expect("gc");
    }
    drop(workers);
    let cycles = progress_total(&tmp.0);
    eprintln!(
        "stress: {cycles} cycles, {kills} kills, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dups = std::fs::read_to_string(tmp.0.join("duplicates")).unwrap_or_default();
    assert!(dups.is_empty(), "duplicate addresses:\n{dups}");

    // What the runtime still knows about: the attachments holding a claim.
    let ipam = open(
        &tmp.0,
        cidrs(&[STRESS_CIDR]),
        Arc::new(FakeClock::new(u64::MAX / 2)),
        Duration::ZERO,
    );
    let mut valid = HashSet::new();
    for entry in std::fs::read_dir(tmp.0.join("claims")).expect("claims") {
        let holder = std::fs::read_to_string(entry.expect("entry").path()).expect("claim");
        if let Some((c, i)) = holder.split_once('/') {
            valid.insert(AttachmentKey {
                container_id: c.into(),
                ifname: i.into(),
            });
        }
    }
    let before = ipam.list().expect("list");
    let mut seen = HashSet::new();
    for a in &before {
        for ip in &a.ips {
            assert!(seen.insert(*ip), "{ip} allocated twice in the state");
        }
    }
    ipam.gc(&valid, Duration::ZERO).expect("gc");
    let after: HashSet<AttachmentKey> = ipam
        .list()
        .expect("list")
        .into_iter()
        .map(|a| a.key)
        .collect();
    assert!(
        after.is_subset(&valid),
        "leaked after GC: {:?}",
        after.difference(&valid).collect::<Vec<_>>()
    );
    // Every address not held by a valid attachment can be handed out again.
    let usable = 29 - after.len();
    for i in 0..usable {
        ipam.allocate(&key(&format!("final-{i}")), &pod("f"), &[])
            .expect("free again");
    }
    assert!(ipam.allocate(&key("one-too-many"), &pod("f"), &[]).is_err());
}
