//! Cross-crate tests of the storage layer on a real loopback cluster: six
//! storage nodes with std-file logs in a temp dir, and the volume client.
//!
//! - No acknowledged commit is lost when any two nodes are killed and
//!   restarted during writes: every segment, read directly, holds exactly
//!   what was acknowledged, also after the whole cluster crashes (on both
//!   disk backends, std files and io_uring).
//! - A corrupted record on disk is found by its CRC on restart and never
//!   served: the segment refuses reads above the hole instead.
//! - Malformed, oversized and wrong-version frames close only their own
//!   connection; the writer's connection to the same node keeps working.
//! - Commits that must wait for the LSN allocation limit all complete.
//! - Over a simulated network that drops, duplicates, reorders and delays
//!   frames (seeded), the writer's retransmission still gets every
//!   acknowledged record onto all six segments.

use bytes::Bytes;
use common::ids::{Lsn, PageId, PgId};
use common::message::{ErrorCode, Message, ReadPageRequest, StatusRequest};
use common::redo::PageOp;
use common::rng::SimRng;
use common::transport::{FaultConfig, MemoryNetwork, TcpTransport, Transport};
use db_frontend::VolumeClient;
use db_frontend::volume::writer::PageChange;
use lab::cluster::{ClusterOptions, LocalCluster, NODE_COUNT};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use storage_node::DiskBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGE_BYTES: usize = 4096;
const PAGES_PER_PG: u64 = 32;
const PG_COUNT: u32 = 2;
const WRITERS: usize = 4;
/// Every test finishes well inside this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

fn options(directory: &std::path::Path) -> ClusterOptions {
    options_on(directory, DiskBackend::Std)
}

fn options_on(directory: &std::path::Path, backend: DiskBackend) -> ClusterOptions {
    let mut options = ClusterOptions::new(directory, backend);
    options.pg_count = PG_COUNT;
    options.page_bytes = PAGE_BYTES;
    options.pg_bytes = PAGES_PER_PG * PAGE_BYTES as u64;
    // Small files: the runs roll and clean log files too.
    options.log_file_bytes = 256 * 1024;
    options
}

/// What each page must hold: writer `w` owns bytes `8w..8w+8` of every page
/// and writes its commit counter there. Updated only after an acknowledgement.
type Model = Arc<Mutex<BTreeMap<u64, [u64; WRITERS]>>>;

fn expected_image(slots: &[u64; WRITERS]) -> Vec<u8> {
    let mut image = vec![0u8; PAGE_BYTES];
    for (writer, value) in slots.iter().enumerate() {
        image[writer * 8..writer * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    image
}

/// Runs `WRITERS` closed-loop committers until `stop` is set.
fn start_writers(
    client: &Arc<VolumeClient>,
    model: &Model,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..WRITERS)
        .map(|writer| {
            let (client, model, stop) = (client.clone(), model.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = SimRng::new(writer as u64 + 1);
                let mut counter = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    counter += 1;
                    let page = rng.below(PAGES_PER_PG * u64::from(PG_COUNT));
                    let data = Bytes::copy_from_slice(&counter.to_le_bytes());
                    let change =
                        PageChange { page: PageId(page), op: PageOp::Write { offset: writer as u32 * 8, data } };
                    client.commit(&[change]).await.expect("commit with at most two nodes down");
                    model.lock().entry(page).or_insert([0; WRITERS])[writer] = counter;
                }
                counter
            })
        })
        .collect()
}

/// Reads a page straight from one node, bypassing the client's choice.
async fn read_from_node(address: &str, pg: PgId, page: PageId, read_point: Lsn) -> Message {
    read_from_node_over(&TcpTransport::new(), address, pg, page, read_point).await
}

async fn read_from_node_over(
    transport: &dyn Transport,
    address: &str,
    pg: PgId,
    page: PageId,
    read_point: Lsn,
) -> Message {
    let mut connection = transport.connect(address.to_string()).await.expect("connect");
    // Read at the segment's own epoch (the writer's, once it opened it).
    let ask = Message::StatusRequest(StatusRequest { request_id: 6, pg });
    connection.sender.send(ask.encode()).await.expect("send");
    let frame = connection.receiver.recv().await.expect("an answer").expect("a valid frame");
    let epoch = match Message::decode(&frame).expect("a valid message") {
        Message::Status(status) => status.epoch,
        other => return other,
    };
    let request = ReadPageRequest { request_id: 7, pg, epoch, page, read_point };
    connection.sender.send(Message::ReadPage(request).encode()).await.expect("send");
    let frame = connection.receiver.recv().await.expect("an answer").expect("a valid frame");
    Message::decode(&frame).expect("a valid message")
}

/// Waits until every segment of each PG has caught up with that PG's PGCL.
async fn wait_until_all_segments_catch_up(cluster: &LocalCluster, client: &VolumeClient) -> Vec<Lsn> {
    let targets: Vec<Lsn> = (0..PG_COUNT).map(|pg| client.pg_complete_lsn(PgId(pg))).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let behind: Vec<(usize, u32)> = (0..NODE_COUNT)
            .flat_map(|node| (0..PG_COUNT).map(move |pg| (node, pg)))
            .filter(|(node, pg)| {
                cluster.segment_complete_lsn(*node, PgId(*pg)).is_none_or(|scl| scl < targets[*pg as usize])
            })
            .collect();
        if behind.is_empty() {
            return targets;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "segments (node, pg) {behind:?} never caught up to {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every page on every node, read at its PG's last LSN, equals the model.
async fn verify_every_segment(cluster: &LocalCluster, model: &BTreeMap<u64, [u64; WRITERS]>, pg_points: &[Lsn]) {
    verify_every_segment_over(&TcpTransport::new(), cluster, model, pg_points).await
}

async fn verify_every_segment_over(
    transport: &dyn Transport,
    cluster: &LocalCluster,
    model: &BTreeMap<u64, [u64; WRITERS]>,
    pg_points: &[Lsn],
) {
    let nodes: Vec<usize> = (0..NODE_COUNT).collect();
    verify_segments_on(transport, cluster, &nodes, model, pg_points).await
}

/// Every page on each of `nodes`, read at its PG's last LSN, equals the model.
async fn verify_segments_on(
    transport: &dyn Transport,
    cluster: &LocalCluster,
    nodes: &[usize],
    model: &BTreeMap<u64, [u64; WRITERS]>,
    pg_points: &[Lsn],
) {
    for &node in nodes {
        for page in 0..PAGES_PER_PG * u64::from(PG_COUNT) {
            let pg = PgId((page / PAGES_PER_PG) as u32);
            let expected = expected_image(model.get(&page).unwrap_or(&[0; WRITERS]));
            match read_from_node_over(transport, cluster.address(node), pg, PageId(page), pg_points[pg.0 as usize])
                .await
            {
                Message::PageImage(image) => {
                    assert!(
                        image.image[..] == expected[..],
                        "node {node} page {page} differs from the acknowledged state"
                    )
                }
                other => panic!("node {node} page {page}: {other:?}"),
            }
        }
    }
}

async fn kill_two_during_writes(pair: (usize, usize), backend: DiskBackend) {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut cluster = LocalCluster::start(&options_on(directory.path(), backend)).await.expect("cluster");
    let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
    let model: Model = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&client, &model, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(pair.0);
    cluster.kill(pair.1);
    let before_kill = client.points().volume_durable;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.points().volume_durable > before_kill, "commits go on with two nodes down");
    cluster.restart(pair.0).await.expect("restart");
    cluster.restart(pair.1).await.expect("restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let commits: u64 = futures_total(writers).await;
    assert!(commits > 20, "the run committed only {commits} records");
    let points = client.points();
    assert_eq!(points.volume_durable, points.highest_allocated, "every commit returned, so all is durable");
    let pg_points = wait_until_all_segments_catch_up(&cluster, &client).await;
    let model = model.lock().clone();
    verify_every_segment(&cluster, &model, &pg_points).await;

    // Crash everything; every node must come back with every acknowledged record.
    client.close();
    cluster.stop();
    for node in 0..NODE_COUNT {
        cluster.restart(node).await.expect("restart after a full crash");
    }
    verify_every_segment(&cluster, &model, &pg_points).await;
}

async fn futures_total(writers: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    let mut total = 0;
    for writer in writers {
        total += writer.await.expect("writer task");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_killing_two_nodes_in_one_az() {
    tokio::time::timeout(TEST_TIMEOUT, kill_two_during_writes((0, 3), DiskBackend::Std)).await.expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_killing_two_nodes_in_two_azs() {
    tokio::time::timeout(TEST_TIMEOUT, kill_two_during_writes((1, 5), DiskBackend::Std)).await.expect("in time");
}

/// The same crash test with every node on the io_uring backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_killing_two_io_uring_nodes() {
    tokio::time::timeout(TEST_TIMEOUT, kill_two_during_writes((2, 4), DiskBackend::IoUring)).await.expect("in time");
}

/// Flips one byte of a record payload in a node's log; the restarted node
/// must find it by CRC, flag repair, and refuse to serve above the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_on_disk_is_detected_and_never_served() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let client = cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume");
        let marker = [0xC7u8; 48];
        let mut last = Lsn::ZERO;
        for round in 0..20u8 {
            let data = if round == 10 { Bytes::copy_from_slice(&marker) } else { Bytes::from(vec![round; 48]) };
            last =
                client.commit(&[PageChange { page: PageId(1), op: PageOp::Write { offset: 0, data } }]).await.unwrap();
        }
        assert_eq!(wait_until_all_segments_catch_up(&cluster, &client).await[0], last);
        cluster.kill(2);
        let segment_directory = directory.path().join("node-2").join("pg-000000");
        let mut flipped = false;
        for entry in std::fs::read_dir(&segment_directory).expect("segment directory") {
            let path = entry.expect("entry").path();
            let mut bytes = std::fs::read(&path).expect("log file");
            if let Some(position) = bytes.windows(marker.len()).position(|window| window == marker) {
                bytes[position + 20] ^= 0x01;
                std::fs::write(&path, &bytes).expect("write back");
                flipped = true;
            }
        }
        assert!(flipped, "the marker record is in node 2's log");
        cluster.restart(2).await.expect("restart");
        let report = cluster.node(2).expect("running").recovery[&PgId(0)].clone();
        assert_eq!(report.mid_log_corruptions, 1, "{report:?}");
        let status = cluster.node(2).expect("running").segment_status(PgId(0)).expect("segment");
        assert!(status.needs_repair);
        assert!(status.segment_complete_lsn < last, "SCL stops below the corrupt record");
        match read_from_node(cluster.address(2), PgId(0), PageId(1), last).await {
            Message::Error(error) => assert_eq!(error.code, ErrorCode::ReadPointAboveComplete),
            other => panic!("a page above the hole was served: {other:?}"),
        }
        // The healthy nodes still serve the right page.
        match read_from_node(cluster.address(3), PgId(0), PageId(1), last).await {
            Message::PageImage(image) => assert_eq!(image.image[..48], [19u8; 48]),
            other => panic!("{other:?}"),
        }
    })
    .await
    .expect("in time");
}

/// Sends `bytes` on a raw connection to `address` and expects the node to
/// close it.
async fn expect_closed_after(address: &str, bytes: &[u8]) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "the node answered a bad frame instead of closing: {read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_own_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
        let model: Model = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&client, &model, &stop);
        let good = Message::StatusRequest(common::message::StatusRequest { request_id: 1, pg: PgId(0) }).encode();
        let mut wrong_version = good.to_vec();
        wrong_version[2] = 99;
        let mut oversized = good.to_vec();
        oversized[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut bad_checksum = good.to_vec();
        let last = bad_checksum.len() - 1;
        bad_checksum[last] ^= 0xFF;
        let node = cluster.address(0).to_string();
        for bad in [&b"GET / HTTP/1.1\r\n\r\n"[..], &wrong_version, &oversized, &bad_checksum] {
            let before = cluster.segment_complete_lsn(0, PgId(0)).expect("running");
            expect_closed_after(&node, bad).await;
            // The writer's own connection to node 0 still carries appends.
            let target = client.points().volume_durable.max(Lsn(before.0 + 1));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while cluster.segment_complete_lsn(0, PgId(0)).expect("running") < target {
                assert!(tokio::time::Instant::now() < deadline, "node 0 stopped taking the writer's appends");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // A well-formed request on a fresh connection is still answered.
        match read_from_node(&node, PgId(0), PageId(0), Lsn::ZERO).await {
            Message::PageImage(_) | Message::Error(_) => {}
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Relaxed);
        assert!(futures_total(writers).await > 0);
    })
    .await
    .expect("in time");
}

/// Drops, duplicates, reordering and delays on every link, two nodes killed
/// and restarted in the middle: once the faults stop, every segment holds
/// exactly what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmission_survives_a_lossy_reordering_network() {
    for seed in [0x5EED, 7, 42] {
        tokio::time::timeout(TEST_TIMEOUT, lossy_run(seed)).await.expect("in time");
    }
}

async fn lossy_run(seed: u64) {
    let directory = tempfile::tempdir().expect("temp dir");
    let network = MemoryNetwork::new(seed);
    network.set_faults(FaultConfig {
        drop_probability: 0.02,
        duplicate_probability: 0.02,
        reorder_probability: 0.05,
        reorder_delay: Duration::from_millis(3),
        delay_min: Duration::ZERO,
        delay_max: Duration::from_micros(300),
    });
    let mut options = options_on(directory.path(), DiskBackend::Memory);
    options.memory_network = Some(network.clone());
    let mut cluster = LocalCluster::start(&options).await.expect("cluster");
    let client = Arc::new(cluster.open_volume(Arc::new(network.clone())).await.expect("volume"));
    let model: Model = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&client, &model, &stop);
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.kill(1);
    cluster.kill(2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.restart(1).await.expect("restart");
    cluster.restart(2).await.expect("restart");
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    let Ok(commits) = tokio::time::timeout(Duration::from_secs(20), futures_total(writers)).await else {
        panic!(
            "seed {seed}: a commit never completed; points {:?}, segments {:#?}",
            client.points(),
            client.segments()
        );
    };
    assert!(commits > 20, "the run committed only {commits} records");
    network.set_faults(FaultConfig::default());
    let pg_points = wait_until_all_segments_catch_up(&cluster, &client).await;
    let model = model.lock().clone();
    verify_every_segment_over(&network, &cluster, &model, &pg_points).await;
}

/// A node whose answers are 200 ms late: reads that try it first are hedged
/// to a second segment and served from there, and the writer learns to try
/// it last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_read_is_hedged_to_a_second_segment() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut options = options(directory.path());
        let slow = 3;
        options.send_delays = vec![(slow, Duration::from_millis(200))];
        let cluster = LocalCluster::start(&options).await.expect("cluster");
        let client = cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume");
        let data = Bytes::from_static(b"hedged");
        let lsn = client
            .commit(&[PageChange { page: PageId(5), op: PageOp::Write { offset: 0, data } }])
            .await
            .expect("commit");
        let slow_node = common::ids::NodeId(slow as u32);
        // The slow node's acknowledgement is late too: wait until the writer
        // knows its segment is complete, so that reads may go to it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !client.segments().iter().any(|view| view.node == slow_node && view.pg == PgId(0) && view.complete >= lsn)
        {
            assert!(tokio::time::Instant::now() < deadline, "the slow node never acknowledged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut hedged = 0;
        for round in 0..12 {
            let read = client.read_page(PageId(5)).await.expect("read");
            assert_eq!(&read.image[..6], b"hedged");
            assert_ne!(read.served_by, slow_node, "round {round}: the slow node won a hedged race");
            if read.hedged {
                hedged += 1;
                assert!(round < 7, "round {round}: the slow node is still tried first");
            }
        }
        assert!(hedged >= 1, "the slow node was never tried first, so hedging was not exercised");
    })
    .await
    .expect("in time");
}

/// Sixteen concurrent commits through a writer whose LSN allocation limit
/// is 2: most must wait for VDL to move before they can allocate, and every
/// one of them still completes (its durability waiter survives the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_wait_for_the_allocation_limit_all_complete() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let mut config = db_frontend::VolumeConfig::new(cluster.geometry().clone());
        config.lsn_allocation_limit = 2;
        let client = Arc::new(VolumeClient::open(config, Arc::new(TcpTransport::new())).await.expect("volume"));
        let commits: Vec<_> = (0..16u64)
            .map(|index| {
                let client = client.clone();
                tokio::spawn(async move {
                    let data = Bytes::copy_from_slice(&index.to_le_bytes());
                    let change = PageChange { page: PageId(index % 8), op: PageOp::Write { offset: 0, data } };
                    client.commit(&[change]).await.expect("commit")
                })
            })
            .collect();
        let mut lsns = Vec::new();
        for commit in commits {
            lsns.push(commit.await.expect("commit task"));
        }
        lsns.sort();
        lsns.dedup();
        assert_eq!(lsns.len(), 16, "sixteen distinct LSNs");
        assert!(client.points().volume_durable >= *lsns.last().expect("sixteen"), "every commit is durable");
    })
    .await
    .expect("in time");
}

/// Deferred writes (the SQL engine's changes inside a transaction) wait
/// unsent, never more than `DEFERRED_RECORD_BYTES_MAX` of them: a
/// transaction larger than that streams out while it runs. A durability
/// wait sends the rest, and every change is then on the segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_writes_stream_past_their_cap_and_go_out_with_the_durability_wait() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let config = db_frontend::VolumeConfig::new(cluster.geometry().clone());
        let client = VolumeClient::open(config, Arc::new(TcpTransport::new())).await.expect("volume");
        let record_data = 4096;
        let mut last = Lsn::ZERO;
        for index in 0..96u64 {
            let data = Bytes::from(vec![index as u8 + 1; record_data]);
            let change = PageChange { page: PageId(index % 8), op: PageOp::Write { offset: 0, data } };
            last = client.write_deferred(&[change]).await.expect("deferred write");
            assert!(
                client.unsent_bytes() <= common::limits::DEFERRED_RECORD_BYTES_MAX + 2 * record_data,
                "{} bytes wait unsent",
                client.unsent_bytes()
            );
        }
        client.wait_durable(last).await.expect("durable");
        assert_eq!(client.unsent_bytes(), 0, "the wait sent what was left");
        assert!(client.points().volume_durable >= last);
        for page in 0..8u64 {
            let read = client.read_page(PageId(page)).await.expect("read");
            let newest = (88 + page) as u8 + 1;
            assert!(read.image[..record_data].iter().all(|&byte| byte == newest), "page {page} holds its last write");
        }
    })
    .await
    .expect("in time");
}

/// A second writer recovers the volume with two nodes down: it seals a
/// write quorum of every PG at a newer epoch, finds every commit the first
/// writer acknowledged, and from then on the first writer is fenced (its
/// next commit fails, it allocates nothing more). The new writer commits;
/// the nodes that were down are opened at its epoch when they come back.
/// With three nodes down a third writer cannot seal a write quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_recovers_the_volume_and_fences_the_first() {
    use db_frontend::volume::client::{VolumeConfig, VolumeError};
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        let old = cluster.open_volume(transport.clone()).await.expect("volume");
        let pages = u64::from(PG_COUNT) * PAGES_PER_PG;
        let change = |page: u64, value: u64| PageChange {
            page: PageId(page),
            op: PageOp::Write { offset: 0, data: Bytes::copy_from_slice(&value.to_le_bytes()) },
        };
        let value_of = |image: &Bytes| u64::from_le_bytes(image[..8].try_into().expect("8 bytes"));
        let mut last = BTreeMap::new();
        for index in 0..40u64 {
            old.commit(&[change(index % pages, index + 1)]).await.expect("commit");
            last.insert(index % pages, index + 1);
        }
        cluster.kill(4);
        cluster.kill(5);

        let mut config = VolumeConfig::new(cluster.geometry().clone());
        let new = VolumeClient::open(config.clone(), transport.clone()).await.expect("recovered on 4 of 6");
        assert!(new.epoch() > old.epoch(), "{} after {}", new.epoch(), old.epoch());
        for (page, value) in &last {
            let read = new.read_page(PageId(*page)).await.expect("read");
            assert_eq!(value_of(&read.image), *value, "page {page} after recovery");
        }
        let error = old.commit(&[change(1, 99)]).await.expect_err("the old writer is fenced");
        assert!(matches!(error, VolumeError::Fenced { .. }), "{error}");
        assert!(old.is_fenced());
        let again = old.commit(&[change(2, 100)]).await.expect_err("and stays fenced");
        assert!(matches!(again, VolumeError::Fenced { .. }), "{again}");

        // The new writer writes every page (the first write of each reads
        // its last LSN from storage), then two more nodes come back.
        for page in 0..pages {
            new.commit(&[change(page, 1000 + page)]).await.expect("commit at the new epoch");
        }
        cluster.restart(4).await.expect("restart");
        cluster.restart(5).await.expect("restart");
        let opened = async {
            while new.segments().iter().any(|view| !view.connected || view.complete < new.pg_complete_lsn(view.pg)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), opened).await.expect("the returning nodes are opened and fed");
        for page in 0..pages {
            let read = new.read_page(PageId(page)).await.expect("read");
            assert_eq!(value_of(&read.image), 1000 + page);
        }

        cluster.kill(3);
        cluster.kill(4);
        cluster.kill(5);
        config.open_timeout = Duration::from_millis(800);
        let short = VolumeClient::open(config, transport).await.expect_err("three nodes down");
        assert!(
            matches!(&short, VolumeError::RecoveryTimedOut { waiting_for, .. } if waiting_for.contains("seal")),
            "{short}"
        );
        old.close();
        new.close();
        cluster.stop();
    })
    .await
    .expect("in time");
}

/// A writer crashes while a node is down; after the node comes back,
/// and with no writer to resend anything, its segments learn from their
/// peers (gossip) that they are behind and fetch what they missed (records,
/// or the page state where peers collected them), until every node serves
/// every page as acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_behind_catch_up_from_their_peers_without_a_writer() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
        let model: Model = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&client, &model, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.kill(5);
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.store(true, Ordering::Relaxed);
        assert!(futures_total(writers).await > 0);
        let targets: Vec<Lsn> = (0..PG_COUNT).map(|pg| client.pg_complete_lsn(PgId(pg))).collect();
        client.close(); // the writer is gone: only peers can bring node 5 back up
        cluster.restart(5).await.expect("restart");
        let behind_at_restart: Vec<Lsn> =
            (0..PG_COUNT).map(|pg| cluster.segment_complete_lsn(5, PgId(pg)).expect("running")).collect();
        assert!((0..PG_COUNT as usize).any(|pg| behind_at_restart[pg] < targets[pg]), "node 5 missed records");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while (0..PG_COUNT).any(|pg| cluster.segment_complete_lsn(5, PgId(pg)).expect("running") < targets[pg as usize])
        {
            assert!(tokio::time::Instant::now() < deadline, "node 5 never caught up from its peers");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let from_peers: u64 = (0..PG_COUNT)
            .map(|pg| {
                let stats = cluster.node(5).expect("running").peer_repair_stats(PgId(pg)).expect("hosted");
                stats.records_received + stats.hydrations_completed
            })
            .sum();
        assert!(from_peers > 0, "the state came from peers");
        let points: Vec<Lsn> = (0..PG_COUNT).map(|pg| cluster.segment_complete_lsn(0, PgId(pg)).expect("up")).collect();
        let model = model.lock().clone();
        verify_every_segment(&cluster, &model, &points).await;
        cluster.stop();
    })
    .await
    .expect("in time");
}

/// A node dies during writes and the writer replaces each of its segments
/// by one on a spare node in the same AZ, with the two-step joint-quorum
/// change, while the load goes on. Afterwards the spare serves every page
/// as acknowledged, the recorded membership names it, a writer that opens
/// the volume with the old membership is refused, and one that opens it
/// with the recorded membership recovers every acknowledged commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_spare_while_writes_go_on() {
    use db_frontend::volume::client::{VolumeConfig, VolumeError};
    use db_frontend::volume::geometry::VolumeGeometry;
    use db_frontend::volume::recovery::RecoveryError;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut cluster_options = options(directory.path());
        cluster_options.spares = 1;
        let mut cluster = LocalCluster::start(&cluster_options).await.expect("cluster");
        let (dead, spare) = (3, NODE_COUNT);
        assert_eq!(LocalCluster::az_of(dead), LocalCluster::az_of(spare), "the spare replaces within its AZ");
        let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
        let model: Model = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&client, &model, &stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.kill(dead);

        let recorded: Arc<Mutex<Vec<VolumeGeometry>>> = Arc::default();
        let record = {
            let recorded = recorded.clone();
            move |geometry: &VolumeGeometry| {
                recorded.lock().push(geometry.clone());
                Ok(())
            }
        };
        let durable_before = client.points().volume_durable;
        for pg in (0..PG_COUNT).map(PgId) {
            let replica = client.geometry().slot_on(pg, common::ids::NodeId(dead as u32)).expect("a member");
            let pg_complete_before = client.pg_complete_lsn(pg);
            let report = client
                .replace_segment(pg, replica, cluster.placement(spare), &record, Duration::from_secs(30))
                .await
                .expect("replaced");
            assert_eq!((report.replaced.0 as usize, report.incoming.0 as usize), (dead, spare));
            assert!(
                report.joint_durable_after <= report.caught_up_after && report.caught_up_after <= report.settled_after
            );
            assert!(
                report.catch_up_target >= pg_complete_before,
                "the newcomer had to hold everything of its PG durable before the change"
            );
        }
        assert!(client.points().volume_durable > durable_before, "writes went on during the changes");
        stop.store(true, Ordering::Relaxed);
        assert!(futures_total(writers).await > 20);

        let geometry = client.geometry();
        assert!(geometry.segments_on(common::ids::NodeId(dead as u32)).is_empty(), "the dead node left every PG");
        assert_eq!(geometry.segments_on(common::ids::NodeId(spare as u32)).len(), PG_COUNT as usize);
        let recorded = recorded.lock().clone();
        assert_eq!(recorded.len(), 2 * PG_COUNT as usize, "joint and settled, per PG, recorded in order");
        assert_eq!(recorded.last(), Some(&geometry));
        for pg in (0..PG_COUNT).map(PgId) {
            assert_eq!(geometry.membership(pg).epoch.0, 3, "initial, joint, settled");
        }

        let pg_points: Vec<Lsn> = (0..PG_COUNT).map(|pg| client.pg_complete_lsn(PgId(pg))).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while (0..PG_COUNT)
            .any(|pg| cluster.segment_complete_lsn(spare, PgId(pg)).is_none_or(|scl| scl < pg_points[pg as usize]))
        {
            assert!(tokio::time::Instant::now() < deadline, "the spare never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let model = model.lock().clone();
        verify_segments_on(&TcpTransport::new(), &cluster, &[spare], &model, &pg_points).await;
        client.close();

        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        let mut stale = VolumeConfig::new(cluster.geometry().clone());
        stale.open_timeout = Duration::from_secs(10);
        let error = VolumeClient::open(stale, transport.clone()).await.expect_err("an older membership");
        assert!(
            matches!(error, VolumeError::Recovery(RecoveryError::StaleMembership { .. })),
            "a writer with the old membership is refused: {error}"
        );
        let recovered = VolumeClient::open(VolumeConfig::new(geometry), transport).await.expect("recovered");
        for (page, slots) in &model {
            let read = recovered.read_page(PageId(*page)).await.expect("read");
            assert!(read.image[..] == expected_image(slots)[..], "page {page} after recovery");
        }
        recovered.close();
        cluster.stop();
    })
    .await
    .expect("in time");
}

/// A replacement whose newcomer never catches up (its node is down) times
/// out with the PG left joint; rolling it back returns the PG to its old
/// six at a newer membership epoch, records that, and commits go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_cannot_finish_is_rolled_back() {
    use db_frontend::volume::client::VolumeError;
    use db_frontend::volume::geometry::VolumeGeometry;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut cluster_options = options(directory.path());
        cluster_options.spares = 1;
        let mut cluster = LocalCluster::start(&cluster_options).await.expect("cluster");
        let spare = NODE_COUNT;
        cluster.kill(spare);
        let client = cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume");
        let change = |value: u64| PageChange {
            page: PageId(0),
            op: PageOp::Write { offset: 0, data: Bytes::copy_from_slice(&value.to_le_bytes()) },
        };
        client.commit(&[change(1)]).await.expect("commit");
        let before = client.geometry();
        let pg = PgId(0);
        let replica = before.slot_on(pg, common::ids::NodeId(0)).expect("node 0 is a member");
        let recorded: Arc<Mutex<Vec<VolumeGeometry>>> = Arc::default();
        let record = {
            let recorded = recorded.clone();
            move |geometry: &VolumeGeometry| {
                recorded.lock().push(geometry.clone());
                Ok(())
            }
        };
        let error = client
            .replace_segment(pg, replica, cluster.placement(spare), &record, Duration::from_millis(500))
            .await
            .expect_err("the spare is down");
        assert!(matches!(&error, VolumeError::Membership { reason, .. } if reason.contains("timed out")), "{error}");
        assert!(client.geometry().membership(pg).replacing.is_some(), "left joint");
        client.commit(&[change(2)]).await.expect("a joint PG still takes writes (4 of both sets)");

        client.roll_back_replacement(pg, &record).expect("rolled back");
        let after = client.geometry();
        assert!(after.membership(pg).replacing.is_none());
        assert_eq!(after.membership(pg).epoch.0, 3, "initial, joint, rolled back");
        assert_eq!(after.segment(pg, replica).node, common::ids::NodeId(0), "the old member stays");
        assert_eq!(recorded.lock().last(), Some(&after), "the roll-back is recorded");
        client.commit(&[change(3)]).await.expect("commit after the roll-back");
        let read = client.read_page(PageId(0)).await.expect("read");
        assert_eq!(read.image[..8], 3u64.to_le_bytes());
        client.close();
        cluster.stop();
    })
    .await
    .expect("in time");
}

/// Closing the client while writers keep logging (a crashed front end):
/// every writer gets an answer at once, and the client spins on nothing
/// (`send_queued` once looped forever on frames it could not send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_client_under_load_ends_every_write_promptly() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS as u64)
            .map(|writer| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut logged = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let data = Bytes::from(vec![writer as u8; 8]);
                        let change = PageChange { page: PageId(writer), op: PageOp::Write { offset: 0, data } };
                        if client.write(&[change]).await.is_err() {
                            break;
                        }
                        logged += 1;
                    }
                    logged
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.close();
        let ended = tokio::time::timeout(Duration::from_secs(5), futures_total(writers)).await;
        let logged = ended.expect("every writer ended within 5 s of close()");
        assert!(logged > 0, "nothing was logged before close()");
        assert_eq!(
            client.write(&[PageChange { page: PageId(0), op: PageOp::ZeroPage }]).await,
            Err(db_frontend::VolumeError::Closed)
        );
    })
    .await
    .expect("test timed out");
}
