//! The lock service over real loopback TCP: a `LockServer` and `Clerk`s.
//!
//! - Locks are sticky, and a revoke makes the holder's workstation flush
//!   before the lock moves on.
//! - Two clerks taking overlapping lock sets, listed in opposite orders,
//!   never deadlock (`acquire_all` sorts).
//! - A clerk whose server is gone drops its locks when its own lease view
//!   runs out.
//! - A clerk that dies holding a lock: its lease runs out, its epoch is
//!   fenced, a live clerk replays its log, and only then is the lock granted
//!   again, in that order.

use common::transport::{BoxFuture, TcpTransport};
use lockserver::protocol::{ClerkId, LeaseEpoch, LockName, Mode};
use lockserver::{
    BoundReplica, Clerk, ClerkConfig, Fencer, LockServer, MemoryRegistryStore, ReplicatedLockServer, ServerConfig,
    Workstation,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const LOCK: LockName = LockName { table: 1, id: 42 };
/// For servers with leases under a second.
const SHORT_LEASE_CLERK: ClerkConfig =
    ClerkConfig { lease_margin_micros: 50_000, renew_every_micros: 100_000, retransmit_micros: 50_000 };

/// What happened, in order, across the server's fencer and the workstations.
type Events = Arc<Mutex<Vec<String>>>;

#[derive(Debug)]
struct RecordingFencer(Events);

impl Fencer for RecordingFencer {
    fn fence(&self, epoch: LeaseEpoch) -> BoxFuture<'static, ()> {
        self.0.lock().push(format!("fence {}", epoch.0));
        Box::pin(async {})
    }
}

#[derive(Debug)]
struct RecordingWorkstation {
    name: &'static str,
    events: Events,
}

impl Workstation for RecordingWorkstation {
    fn flush(&self, lock: LockName, keep: Option<Mode>) -> BoxFuture<'static, ()> {
        self.events.lock().push(format!("{} flush {} keep {keep:?}", self.name, lock.id));
        Box::pin(tokio::time::sleep(Duration::from_millis(5)))
    }

    fn recover(&self, dead: LeaseEpoch, _dead_clerk: ClerkId) -> BoxFuture<'static, ()> {
        self.events.lock().push(format!("{} recover {}", self.name, dead.0));
        Box::pin(tokio::time::sleep(Duration::from_millis(5)))
    }

    fn lease_lost(&self) {
        self.events.lock().push(format!("{} lease lost", self.name));
    }
}

async fn start_server(lease: Duration, events: &Events) -> LockServer {
    let config = ServerConfig { lease_micros: lease.as_micros() as u64, retransmit_micros: 50_000 };
    LockServer::start(
        config,
        Arc::new(TcpTransport::with_direct_writes()),
        "127.0.0.1:0".into(),
        Arc::new(RecordingFencer(events.clone())),
    )
    .await
    .expect("lock server")
}

async fn clerk(server: &LockServer, id: u64, name: &'static str, config: ClerkConfig, events: &Events) -> Clerk {
    let workstation = Arc::new(RecordingWorkstation { name, events: events.clone() });
    Clerk::connect(
        ClerkId(id),
        config,
        Arc::new(TcpTransport::with_direct_writes()),
        server.local_address().to_string(),
        workstation,
        Duration::from_secs(5),
    )
    .await
    .expect("a lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_lock_moves_only_after_its_holder_flushed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let server = start_server(Duration::from_secs(10), &events).await;
        let config = ClerkConfig::default();
        let a = clerk(&server, 1, "a", config, &events).await;
        let b = clerk(&server, 2, "b", config, &events).await;
        let first = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("cold acquire");
        let token = first.token;
        drop(first);
        let again = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("cached acquire");
        assert_eq!(again.token, token, "a sticky lock is reused without a new grant");
        drop(again);
        assert!(events.lock().is_empty(), "nothing was flushed yet: {:?}", events.lock());

        let moved = b.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("b gets it after a's flush");
        assert!(moved.token > token);
        assert_eq!(events.lock().clone(), vec!["a flush 42 keep None".to_string()]);
        assert_eq!(server.holders(LOCK).len(), 1, "a released it entirely");

        // Readers share: b downgrades to shared and both hold it.
        drop(moved);
        let reader = a.acquire(LOCK, Mode::Shared, Duration::from_secs(5)).await.expect("a reads");
        assert_eq!(events.lock().last().map(String::as_str), Some("b flush 42 keep Some(Shared)"));
        let other_reader = b.acquire(LOCK, Mode::Shared, Duration::from_secs(5)).await.expect("b still reads");
        assert_eq!(server.holders(LOCK).len(), 2);
        drop((reader, other_reader));
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_fenced_and_recovered_before_its_lock_moves() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let lease = Duration::from_millis(400);
        let server = start_server(lease, &events).await;
        let config = SHORT_LEASE_CLERK;
        let a = clerk(&server, 1, "a", config, &events).await;
        let b = clerk(&server, 2, "b", config, &events).await;
        let held = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("a holds it");
        let dead_epoch = held.epoch;
        std::mem::forget(held); // a crashes in the middle of an operation
        a.stop();
        let started = std::time::Instant::now();
        let taken = b.acquire(LOCK, Mode::Exclusive, Duration::from_secs(10)).await.expect("b gets it in the end");
        assert!(started.elapsed() >= lease / 2, "the lock moved before a's lease could have run out");
        assert!(taken.epoch != dead_epoch);
        let events = events.lock().clone();
        let fence = format!("fence {}", dead_epoch.0);
        let recover = format!("b recover {}", dead_epoch.0);
        let fenced_at = events.iter().position(|event| *event == fence).expect("a's epoch was fenced");
        let recovered_at = events.iter().position(|event| *event == recover).expect("b replayed a's log");
        assert!(fenced_at < recovered_at, "recovery started before the fence: {events:?}");
        assert!(!events.iter().any(|event| event.starts_with("a flush")), "a never flushed: it was dead");
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_lock_sets_in_opposite_orders_do_not_deadlock() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let server = start_server(Duration::from_secs(10), &events).await;
        let config = ClerkConfig::default();
        let a = Arc::new(clerk(&server, 1, "a", config, &events).await);
        let b = Arc::new(clerk(&server, 2, "b", config, &events).await);
        let (first, second) = (LockName { table: 1, id: 1 }, LockName { table: 1, id: 2 });
        let run = |clerk: Arc<Clerk>, order: [LockName; 2]| {
            tokio::spawn(async move {
                for _ in 0..50 {
                    let set = [(order[0], Mode::Exclusive), (order[1], Mode::Exclusive), (order[0], Mode::Shared)];
                    let guards = match clerk.acquire_all(&set, Duration::from_secs(5)).await {
                        Ok(guards) => guards,
                        Err(error) => {
                            return Err(format!(
                                "{error}: {} | {}",
                                clerk.describe(LockName { table: 1, id: 1 }),
                                clerk.describe(LockName { table: 1, id: 2 })
                            ));
                        }
                    };
                    assert_eq!(guards.len(), 2, "a lock listed twice is held once");
                    assert!(guards.iter().all(|guard| guard.mode == Mode::Exclusive));
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Ok(())
            })
        };
        let (from_a, from_b) = (run(a.clone(), [first, second]), run(b.clone(), [second, first]));
        let results = [from_a.await.expect("clerk a's task"), from_b.await.expect("clerk b's task")];
        for result in results {
            if let Err(error) = result {
                panic!("{error}; server: {:?} {:?}", server.holders(first), server.holders(second));
            }
        }
    })
    .await
    .expect("in time");
}

/// The server dies: renewals stop being answered, so the clerk's own view
/// of its lease runs out, it drops every lock (the workstation hears
/// `lease_lost`) and it holds nothing, without any message from the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clerk_whose_server_is_gone_drops_its_locks_when_its_lease_runs_out() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let server = start_server(Duration::from_millis(400), &events).await;
        let config = SHORT_LEASE_CLERK;
        let a = clerk(&server, 1, "a", config, &events).await;
        drop(a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("a holds it"));
        server.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !events.lock().iter().any(|event| event == "a lease lost") {
            assert!(tokio::time::Instant::now() < deadline, "the clerk kept its lease without a server");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.lease(), None);
        let error = a.acquire(LOCK, Mode::Shared, Duration::from_millis(200)).await.expect_err("no server, no lock");
        assert!(matches!(error, lockserver::ClerkError::Timeout { .. }), "{error}");
    })
    .await
    .expect("in time");
}

/// Mode 1 of a lock-server failure: a single server restarts from its
/// saved registry. The clerk that held a lock keeps it (it reclaims it in
/// the grace period), nothing is granted in conflict with it, and the next
/// grant of the lock carries a larger fencing token than any before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_lets_clerks_reclaim_their_locks_and_grants_nothing_in_conflict() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let store = Arc::new(MemoryRegistryStore::default());
        let config = ServerConfig { lease_micros: 600_000, retransmit_micros: 50_000 };
        let start = |address: String| {
            let (store, events) = (store.clone(), events.clone());
            async move {
                let transport = Arc::new(TcpTransport::with_direct_writes());
                let fencer = Arc::new(RecordingFencer(events));
                LockServer::start_with_registry(config, transport, address, fencer, store).await
            }
        };
        let server = start("127.0.0.1:0".into()).await.expect("lock server");
        let address = server.local_address().to_string();
        let clerk_config = SHORT_LEASE_CLERK;
        let a = clerk(&server, 1, "a", clerk_config, &events).await;
        let b = clerk(&server, 2, "b", clerk_config, &events).await;
        let held = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("a holds it");
        let (epoch, token) = (held.epoch, held.token);
        drop(held);

        server.stop();
        drop(server);
        // The same address: the clerks' links reconnect to the new server.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let server = loop {
            match start(address.clone()).await {
                Ok(server) => break server,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "rebinding");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("could not restart the lock server on {address}: {error}"),
            }
        };
        let taken = b.acquire(LOCK, Mode::Exclusive, Duration::from_secs(10)).await.expect("b gets it in the end");
        assert!(taken.token > token, "a token of the new run ({:?}) is above the old ones ({token:?})", taken.token);
        let log = events.lock().clone();
        assert!(
            log.iter().any(|event| *event == "a flush 42 keep None"),
            "a kept its lock across the restart and gave it up only by a revoke: {log:?}"
        );
        assert!(!log.iter().any(|event| event.starts_with("fence")), "nobody's lease was lost: {log:?}");
        assert_eq!(a.lease(), Some(epoch), "a's lease went on across the restart");
        drop(taken);
        server.stop();
    })
    .await
    .expect("in time");
}

/// Mode 2: three replicas under openraft. The clerks talk to all three.
/// The leader is killed while a clerk holds a lock: a new leader takes
/// over with the whole lock state, the holder keeps its lock and lease,
/// and the lock moves to another clerk only through a revoke and a flush,
/// with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_service_fails_over_without_losing_a_held_lock() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let events: Events = Arc::default();
        let transport: Arc<dyn common::transport::Transport> = Arc::new(TcpTransport::with_direct_writes());
        let mut bound = Vec::new();
        for id in 1..=3u64 {
            let replica = BoundReplica::bind(id, transport.clone(), "127.0.0.1:0".into(), "127.0.0.1:0".into())
                .await
                .expect("bind a replica");
            bound.push(replica);
        }
        let members: std::collections::BTreeMap<u64, String> =
            bound.iter().enumerate().map(|(index, replica)| (index as u64 + 1, replica.raft_address())).collect();
        let config = ServerConfig { lease_micros: 2_000_000, retransmit_micros: 50_000 };
        let mut replicas = Vec::new();
        for replica in bound {
            let fencer = Arc::new(RecordingFencer(events.clone()));
            replicas.push(ReplicatedLockServer::start(replica, config, members.clone(), fencer).await.expect("start"));
        }
        let addresses: Vec<String> = replicas.iter().map(|replica| replica.clerk_address().to_string()).collect();
        let clerk_config =
            ClerkConfig { lease_margin_micros: 200_000, renew_every_micros: 200_000, retransmit_micros: 100_000 };
        let connect = |id: u64, name: &'static str| {
            let (transport, addresses, events) = (transport.clone(), addresses.clone(), events.clone());
            async move {
                let workstation = Arc::new(RecordingWorkstation { name, events });
                Clerk::connect_replicated(
                    ClerkId(id),
                    clerk_config,
                    transport,
                    addresses,
                    workstation,
                    Duration::from_secs(10),
                )
                .await
                .expect("a lease from the replicated service")
            }
        };
        let a = connect(1, "a").await;
        let b = connect(2, "b").await;
        let held = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(10)).await.expect("a holds it");
        let (epoch, token) = (held.epoch, held.token);
        drop(held);

        let leader = replicas.iter().position(ReplicatedLockServer::is_leader).expect("a leader");
        let old_leader = replicas[leader].id();
        replicas[leader].stop().await;
        let survivors: Vec<&ReplicatedLockServer> =
            replicas.iter().filter(|replica| replica.id() != old_leader).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !survivors.iter().any(|replica| replica.is_leader()) {
            assert!(tokio::time::Instant::now() < deadline, "no new leader was elected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let new_leader = survivors.iter().find(|replica| replica.is_leader()).expect("elected");
        // A new leader applies the entries it inherited shortly after its
        // election: wait for its state machine, then compare.
        while new_leader.holders(LOCK).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(new_leader.holders(LOCK), vec![(epoch, Mode::Exclusive, token)], "the new leader knows a's lock");

        let taken = b.acquire(LOCK, Mode::Exclusive, Duration::from_secs(10)).await.expect("b gets it in the end");
        assert!(taken.token > token);
        let log = events.lock().clone();
        assert!(log.iter().any(|event| *event == "a flush 42 keep None"), "a gave it up by a revoke: {log:?}");
        assert!(!log.iter().any(|event| event.contains("lease lost") || event.starts_with("fence")), "{log:?}");
        assert_eq!(a.lease(), Some(epoch), "a's lease went on across the failover");
        drop(taken);
        for replica in &replicas {
            replica.stop().await;
        }
    })
    .await
    .expect("in time");
}
