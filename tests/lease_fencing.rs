//! Fencing in storage closes Frangipani's "lease margin" hole (F97 §4).
//!
//! A workstation's write that is delayed past its lease expiry must be
//! refused by the storage and never become visible, even where it reaches
//! segments that missed the fence. The lock server seals the dead lease
//! epoch on the block volume (through `BlockClient::seal`) before it lets
//! anyone replay the dead workstation's log or take its locks.

use bytes::Bytes;
use common::ids::{BlockId, PgId};
use common::message::{BlockWrite, Message};
use common::transport::{BoxFuture, MemoryNetwork, TcpTransport, Transport};
use lab::cluster::{ClusterOptions, LocalCluster};
use lockserver::protocol::{ClerkId, LeaseEpoch, LockName, Mode};
use lockserver::{Clerk, ClerkConfig, Fencer, LockServer, ServerConfig, Workstation};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use storage_node::DiskBackend;
use storage_node::block_client::{BlockClient, BlockError, REPLICAS};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const LOCK: LockName = LockName { table: 1, id: 7 };
const BLOCK: BlockId = BlockId(7);

type Events = Arc<Mutex<Vec<String>>>;

/// A `LocalCluster` with a one-PG block volume (on memory disks), and the
/// transport its clients use.
struct BlockCluster {
    cluster: LocalCluster,
    transport: Arc<dyn Transport>,
    _directory: tempfile::TempDir,
}

impl BlockCluster {
    /// On loopback TCP, or on a simulated network where nodes restart at
    /// the same address.
    async fn start(network: Option<MemoryNetwork>) -> BlockCluster {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut options = ClusterOptions::new(directory.path(), DiskBackend::Memory);
        options.pg_bytes = 128 * options.page_bytes as u64; // the redo volume is not used here
        options.block_pgs = 1;
        options.memory_network = network.clone();
        let transport: Arc<dyn Transport> = match network {
            Some(network) => Arc::new(network),
            None => Arc::new(TcpTransport::new()),
        };
        let cluster = LocalCluster::start(&options).await.expect("cluster");
        BlockCluster { cluster, transport, _directory: directory }
    }

    fn client(&self) -> BlockClient {
        let mut client = self.cluster.block_client(self.transport.clone()).expect("a block volume");
        client.timeout = Duration::from_secs(5);
        client
    }

    /// A crash: nothing more is answered; what was durable stays.
    fn stop(&mut self, index: usize) {
        self.cluster.kill(index);
    }

    async fn restart(&mut self, index: usize) {
        self.cluster.restart(index).await.expect("restart");
    }

    /// Sends a block write to one node only, as a delayed frame from the
    /// past would arrive; returns whether that segment took it.
    async fn deliver_to(&self, index: usize, write: BlockWrite) -> bool {
        let address = self.cluster.address(index).to_string();
        let mut connection = self.transport.connect(address).await.expect("connect");
        connection.sender.try_send(Message::BlockWrite(write).encode()).expect("send");
        let frame = tokio::time::timeout(Duration::from_secs(5), connection.receiver.recv())
            .await
            .expect("an answer")
            .expect("open connection")
            .expect("a valid frame");
        match Message::decode(&frame).expect("a message") {
            Message::BlockWriteAck(_) => true,
            Message::Error(_) => false,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

fn late_write(block: BlockId, version: u64, epoch: u64, token: u64, data: &'static str) -> BlockWrite {
    BlockWrite {
        request_id: 1,
        pg: PgId(0),
        block,
        version,
        lease_epoch: epoch,
        fencing_token: token,
        repair: false,
        data: Bytes::from_static(data.as_bytes()),
    }
}

/// The lock server's fencer: seals the dead epoch on the block volume,
/// retrying until it holds (recovery must not start before).
#[derive(Debug)]
struct SealingFencer {
    client: Arc<BlockClient>,
    events: Events,
}

impl Fencer for SealingFencer {
    fn fence(&self, epoch: LeaseEpoch) -> BoxFuture<'static, ()> {
        let (client, events) = (self.client.clone(), self.events.clone());
        Box::pin(async move {
            let report = client.seal_until_done(epoch.0).await;
            events.lock().push(format!("sealed {} ({} blocks)", epoch.0, report.blocks));
        })
    }
}

#[derive(Debug)]
struct QuietWorkstation {
    name: &'static str,
    events: Events,
}

impl Workstation for QuietWorkstation {
    fn flush(&self, _lock: LockName, _keep: Option<Mode>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn recover(&self, dead: LeaseEpoch, _dead_clerk: ClerkId) -> BoxFuture<'static, ()> {
        self.events.lock().push(format!("{} recovers {}", self.name, dead.0));
        Box::pin(async {})
    }

    fn lease_lost(&self) {
        self.events.lock().push(format!("{} lease lost", self.name));
    }
}

async fn clerk(server: &LockServer, id: u64, name: &'static str, events: &Events) -> Clerk {
    let config = ClerkConfig { lease_margin_micros: 50_000, renew_every_micros: 100_000, retransmit_micros: 50_000 };
    Clerk::connect(
        ClerkId(id),
        config,
        Arc::new(TcpTransport::new()),
        server.local_address().to_string(),
        Arc::new(QuietWorkstation { name, events: events.clone() }),
        Duration::from_secs(5),
    )
    .await
    .expect("a lease")
}

/// The acceptance test: workstation `a` holds the lock, writes, and
/// then stalls with one more write in flight. Its lease runs out, the lock
/// server seals its epoch in storage, `b` recovers and takes the lock. The
/// stalled write finally arrives: every segment refuses it, and `b` reads
/// what `a` wrote in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_delayed_past_its_lease_expiry_is_refused_and_never_visible() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let cluster = BlockCluster::start(None).await;
        let client = Arc::new(cluster.client());
        let events: Events = Arc::default();
        let fencer = Arc::new(SealingFencer { client: client.clone(), events: events.clone() });
        let config = ServerConfig { lease_micros: 400_000, retransmit_micros: 50_000 };
        let server = LockServer::start(config, Arc::new(TcpTransport::new()), "127.0.0.1:0".into(), fencer)
            .await
            .expect("lock server");
        let a = clerk(&server, 1, "a", &events).await;
        let b = clerk(&server, 2, "b", &events).await;

        let held = a.acquire(LOCK, Mode::Exclusive, Duration::from_secs(5)).await.expect("a holds the lock");
        let (epoch, token) = (held.epoch.0, held.token.0);
        client.write(BLOCK, 1, epoch, token, Bytes::from_static(b"written in time")).await.expect("a's write");
        // a stalls: its next write sits in a queue somewhere, and a stops renewing.
        let delayed = late_write(BLOCK, 2, epoch, token, "written too late");
        std::mem::forget(held);
        a.stop();

        let taken = b.acquire(LOCK, Mode::Exclusive, Duration::from_secs(20)).await.expect("b gets the lock");
        assert!(taken.token.0 > token);
        let log = events.lock().clone();
        let sealed = log.iter().position(|event| event.starts_with(&format!("sealed {epoch} (1 blocks)")));
        let recovered = log.iter().position(|event| *event == format!("b recovers {epoch}"));
        assert!(sealed.is_some() && sealed < recovered, "seal, then recovery: {log:?}");

        // The stalled write arrives now, through the normal client path...
        let refused = client
            .write(delayed.block, delayed.version, epoch, token, delayed.data.clone())
            .await
            .expect_err("a fenced epoch's write is refused");
        assert!(matches!(refused, BlockError::Fenced { .. }), "{refused}");
        // ...and straight at every segment, as a frame delayed in the network.
        for index in 0..REPLICAS {
            assert!(!cluster.deliver_to(index, delayed.clone()).await, "segment {index} took the late write");
        }
        let read = client.read(BLOCK).await.expect("b reads");
        assert_eq!((&read.data[..], read.version, read.lease_epoch), (&b"written in time"[..], 1, epoch));

        client.write(BLOCK, 1, taken.epoch.0, taken.token.0, Bytes::from_static(b"b's")).await.expect("b writes");
        assert_eq!(&client.read(BLOCK).await.expect("read").data[..], b"b's");
        drop(taken);
        server.stop();
        b.stop();
    })
    .await
    .expect("in time");
}

/// The hard case: two segments are down while the epoch is sealed, come
/// back without the fence, and then take the late writes. Reads meeting
/// both of them and only one fenced segment still never see those writes,
/// and still see everything the dead epoch completed in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_writes_taken_by_segments_that_missed_the_fence_stay_invisible() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut cluster = BlockCluster::start(Some(MemoryNetwork::new(7))).await;
        let writer = cluster.client();
        let (old_epoch, old_token, dead_epoch, dead_token) = (3, 8, 5, 10);
        let (overwritten, untouched, partial) = (BlockId(1), BlockId(2), BlockId(3));
        let old = Bytes::from_static(b"old holder");
        let in_time = Bytes::from_static(b"in time");
        writer.write(overwritten, 1, old_epoch, old_token, old.clone()).await.expect("old holder");
        writer.write(untouched, 1, old_epoch, old_token, old.clone()).await.expect("old holder");
        writer.write(overwritten, 1, dead_epoch, dead_token, in_time.clone()).await.expect("dead one, in time");
        // A write of the dead epoch that reached only four segments, 0..=3.
        cluster.stop(4);
        cluster.stop(5);
        writer.write(partial, 1, dead_epoch, dead_token, in_time.clone()).await.expect("on four segments");
        cluster.restart(4).await;
        cluster.restart(5).await;

        // Segments 0 and 1 are down while the epoch is sealed on 2..=5.
        cluster.stop(0);
        cluster.stop(1);
        let report = writer.seal(dead_epoch).await.expect("sealed on four segments");
        assert_eq!(report.blocks, 2, "the dead epoch wrote two blocks that the fenced segments hold");
        cluster.restart(0).await;
        cluster.restart(1).await;

        // The late writes reach the two segments that never heard of the fence.
        for block in [overwritten, untouched, partial] {
            for index in [0, 1] {
                let write = late_write(block, 2, dead_epoch, dead_token, "too late");
                assert!(cluster.deliver_to(index, write).await, "segment {index} missed the fence and took it");
            }
        }
        let refused = writer.write(untouched, 3, dead_epoch, dead_token, Bytes::from_static(b"x")).await;
        assert!(matches!(refused, Err(BlockError::Fenced { .. })), "{refused:?}");

        // Read with only 0, 1 and one fenced segment answering, for each
        // fenced segment in turn, by a client that knows nothing yet.
        for fenced in 2..REPLICAS {
            for index in (2..REPLICAS).filter(|index| *index != fenced) {
                cluster.stop(index);
            }
            let reader = cluster.client();
            let expect = [(overwritten, &in_time), (untouched, &old), (partial, &in_time)];
            for (block, expected) in expect {
                let read = reader.read(block).await.expect("read");
                assert_eq!(&read.data, expected, "{block} read through segments 0, 1 and {fenced}");
            }
            for index in (2..REPLICAS).filter(|index| *index != fenced) {
                cluster.restart(index).await;
            }
        }
    })
    .await
    .expect("in time");
}
