//! The storage engine under the SQL layer (`db_frontend::engine`) on a real
//! loopback cluster of six storage nodes.
//!
//! - Random operation sequences (seeded) match a `BTreeMap` model
//!   ([`MemoryKv`]) of every tree across writer crashes: a crash with a
//!   transaction open loses exactly that transaction (its undo log is
//!   rolled back by the next writer), and every committed one survives.
//! - Every page the front end has cached equals, byte for byte, the page a
//!   segment materializes from the physical-logical redo records.
//! - With two storage nodes killed mid-load, commits go on and nothing
//!   acknowledged is lost.

use common::rng::SimRng;
use common::transport::TcpTransport;
use db_frontend::VolumeClient;
use db_frontend::engine::AuroraKv;
use db_frontend::sql::kv::{CATALOG_TREE, KvStore, KvTxn, MemoryKv, TreeId};
use lab::cluster::{ClusterOptions, LocalCluster};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;
use storage_node::DiskBackend;

const PAGE_BYTES: usize = 8192;
const PAGES_PER_PG: u64 = 4096;
/// Every test finishes well inside this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A small cache, so pages are evicted and read back from storage.
const CACHE_PAGES: usize = 64;

fn options(directory: &std::path::Path) -> ClusterOptions {
    let mut options = ClusterOptions::new(directory, DiskBackend::Std);
    options.pg_count = 2;
    options.page_bytes = PAGE_BYTES;
    options.pg_bytes = PAGES_PER_PG * PAGE_BYTES as u64;
    options.log_file_bytes = 4 * 1024 * 1024;
    options
}

async fn open(cluster: &LocalCluster) -> (Arc<VolumeClient>, AuroraKv, db_frontend::engine::OpenReport) {
    let volume = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
    let (store, report) = AuroraKv::open(volume.clone(), CACHE_PAGES).await.expect("engine");
    (volume, store, report)
}

type Trees = BTreeMap<TreeId, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Every tree of `store`, read through a transaction.
async fn contents(store: &AuroraKv, trees: &[TreeId]) -> Trees {
    let mut txn = store.begin().await.expect("begin");
    let mut all = BTreeMap::new();
    for tree in trees.iter().copied().chain([CATALOG_TREE]) {
        let entries = txn.scan(tree, Bound::Unbounded, Bound::Unbounded, None).await.expect("scan");
        all.insert(tree, entries.into_iter().collect());
    }
    txn.commit().await.expect("commit");
    all
}

/// Fails with the first difference, briefly (whole trees are too long to print).
fn assert_same(real: &Trees, model: &Trees, context: &str) {
    assert_eq!(real.keys().collect::<Vec<_>>(), model.keys().collect::<Vec<_>>(), "{context}: trees");
    for (tree, entries) in real {
        let expected = &model[tree];
        for key in entries.keys().chain(expected.keys()) {
            let (got, want) = (entries.get(key).map(Vec::len), expected.get(key).map(Vec::len));
            let same = entries.get(key) == expected.get(key);
            assert!(same, "{context}: {tree} key {:?}: value of {got:?} bytes, expected {want:?}", &key[..2]);
        }
    }
}

fn key(rng: &mut SimRng) -> Vec<u8> {
    let number = rng.below(600) as u16;
    let mut key = number.to_be_bytes().to_vec();
    key.extend(std::iter::repeat_n(b'k', rng.below(60) as usize));
    key
}

/// One random change, to both stores.
async fn random_change(rng: &mut SimRng, trees: &[TreeId], real: &mut impl KvTxn, model: &mut impl KvTxn) {
    let tree = trees[rng.below(trees.len() as u64) as usize];
    let key = key(rng);
    if rng.below(4) == 0 {
        let (real_found, model_found) = (real.delete(tree, &key).await, model.delete(tree, &key).await);
        assert_eq!(real_found, model_found, "delete");
    } else {
        let value = vec![rng.below(256) as u8; rng.below(900) as usize];
        real.put(tree, &key, &value).await.expect("put");

        model.put(tree, &key, &value).await.expect("put");
    }
    if rng.below(8) == 0 {
        let low = key.clone();
        let limit = rng.below(40) as usize;
        let range = || (Bound::Included(low.clone()), Bound::Unbounded);
        let real_scan = real.scan(tree, range().0, range().1, Some(limit)).await.expect("scan");
        let model_scan = model.scan(tree, range().0, range().1, Some(limit)).await.expect("scan");
        assert_eq!(real_scan, model_scan, "scan");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_matches_a_btreemap_model_across_writer_crashes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let (mut volume, mut store, report) = open(&cluster).await;
        assert!(report.created);
        let model = MemoryKv::default();
        let mut rng = SimRng::new(7);

        let mut trees = Vec::new();
        {
            let (mut real, mut expected) = (store.begin().await.unwrap(), model.begin().await.unwrap());
            for _ in 0..3 {
                let tree = real.create_tree().await.unwrap();
                assert_eq!(expected.create_tree().await.unwrap(), tree, "both stores number trees alike");
                trees.push(tree);
            }
            real.commit().await.unwrap();
            expected.commit().await.unwrap();
        }

        let mut crashes = 0;
        let mut rolled_back = 0;
        let mut history = Vec::new();
        for round in 0..40 {
            let (mut real, mut expected) = (store.begin().await.unwrap(), model.begin().await.unwrap());
            for _ in 0..rng.below(30) + 1 {
                random_change(&mut rng, &trees, &mut real, &mut expected).await;
            }
            match rng.below(5) {
                0 => {
                    real.rollback().await.unwrap();
                    expected.rollback().await.unwrap();
                    rolled_back += 1;
                    history.push("rollback".to_string());
                }
                1 => {
                    // The writer crashes with the transaction open: its
                    // changes must vanish. Every other crash comes after
                    // they were made durable (not committed), so recovery
                    // must roll them back with their undo; otherwise some
                    // may still wait unsent (deferred) and are simply lost.
                    let durable_first = crashes % 2 == 0;
                    if durable_first {
                        volume.wait_durable(volume.points().highest_allocated).await.expect("durable");
                    }
                    volume.close();
                    drop(real);
                    expected.rollback().await.unwrap();
                    drop(store);
                    let (new_volume, new_store, report) = open(&cluster).await;
                    assert!(!report.created);
                    if durable_first {
                        assert!(report.rolled_back_entries > 0, "round {round}: the open transaction left undo");
                    }
                    (volume, store) = (new_volume, new_store);
                    crashes += 1;
                    history.push(format!("crash, {} entries rolled back", report.rolled_back_entries));
                }
                _ => {
                    real.commit().await.unwrap();
                    expected.commit().await.unwrap();
                    history.push("commit".to_string());
                }
            }
            assert_same(
                &contents(&store, &trees).await,
                &model.snapshot().await,
                &format!("round {round} after {:?}", &history[history.len().saturating_sub(3)..]),
            );
        }
        assert!(crashes >= 3 && rolled_back >= 3, "{crashes} crashes, {rolled_back} rollbacks");
        assert!(store.cached_pages().await > CACHE_PAGES / 2);

        // A tree dropped and a tree created in a transaction that rolls back.
        let mut real = store.begin().await.unwrap();
        real.drop_tree(trees[0]).await.unwrap();
        let created = real.create_tree().await.unwrap();
        real.put(created, b"x", b"y").await.unwrap();
        real.rollback().await.unwrap();
        let mut txn = store.begin().await.unwrap();
        assert_eq!(txn.get(created, b"x").await, Err(db_frontend::sql::kv::KvError::NoSuchTree(created)));
        txn.commit().await.unwrap();
        assert_same(&contents(&store, &trees).await, &model.snapshot().await, "after the dropped tree came back");

        // Drop commits and survives a restart.
        let mut txn = store.begin().await.unwrap();
        txn.drop_tree(trees[2]).await.unwrap();
        txn.commit().await.unwrap();
        volume.close();
        drop(store);
        let (volume, store, _) = open(&cluster).await;
        let mut txn = store.begin().await.unwrap();
        assert_eq!(txn.get(trees[2], b"a").await, Err(db_frontend::sql::kv::KvError::NoSuchTree(trees[2])));
        txn.commit().await.unwrap();
        volume.close();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_pages_equal_what_the_segments_materialize() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let (volume, store, _) = open(&cluster).await;
        let mut txn = store.begin().await.unwrap();
        let tree = txn.create_tree().await.unwrap();
        for index in 0..2000u32 {
            let mut key = index.wrapping_mul(2_654_435_761).to_be_bytes().to_vec();
            key.extend_from_slice(&[b'k'; 100]);
            txn.put(tree, &key, &[index as u8; 150]).await.unwrap();
            if index % 3 == 0 {
                txn.delete(tree, &key).await.unwrap();
            }
        }
        txn.commit().await.unwrap();
        // Everything is durable; each cached page, read back from a segment
        // at VDL, is the same bytes.
        let pages = store.cached_page_images().await;
        assert!(pages.len() > 20, "{} pages cached", pages.len());
        for (page, image) in pages {
            let read = volume.read_page(page).await.expect("read");
            assert!(read.image[..] == image[..], "{page}: the segment's page differs from the cached one");
        }
        volume.close();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_shows_only_whole_committed_transactions() {
    use db_frontend::engine::replica::ReplicaKv;
    const KEYS: u32 = 200;
    const TRANSACTIONS: u32 = 40;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(&options(directory.path())).await.expect("cluster");
        let (volume, store, _) = open(&cluster).await;
        let mut txn = store.begin().await.unwrap();
        let tree = txn.create_tree().await.unwrap();
        txn.commit().await.unwrap();
        let replica = ReplicaKv::start(&store, CACHE_PAGES).await.expect("replica");
        let held = replica.read_point().await;
        assert!(volume.points().min_read_point <= held, "the replica's read point is held");

        // The writer: each transaction sets every key to its number (300
        // bytes, so pages split inside transactions); every fifth rolls back.
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for number in 1..=TRANSACTIONS {
                    let mut txn = store.begin().await.unwrap();
                    for key in 0..KEYS {
                        txn.put(tree, &key.to_be_bytes(), &[number as u8; 300]).await.unwrap();
                    }
                    if number % 5 == 0 { txn.rollback().await.unwrap() } else { txn.commit().await.unwrap() }
                }
            })
        };
        // The reader: every read sees one committed transaction, whole.
        let mut reads = 0;
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() || reads == 0 {
            let mut txn = replica.begin().await.unwrap();
            let entries = txn.scan(tree, Bound::Unbounded, Bound::Unbounded, None).await.unwrap();
            txn.commit().await.unwrap();
            let numbers: std::collections::BTreeSet<u8> =
                entries.iter().flat_map(|(_, value)| value.iter().copied()).collect();
            assert!(
                entries.is_empty() || entries.len() == KEYS as usize,
                "{} entries: a transaction shown in part",
                entries.len()
            );
            assert!(numbers.len() <= 1, "values of several transactions at once: {numbers:?}");
            if let Some(number) = numbers.first() {
                assert!(number % 5 != 0, "transaction {number} rolled back, yet the replica shows it");
                seen.insert(*number);
            }
            reads += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        writer.await.unwrap();
        // It catches up to the writer's last transaction.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut txn = replica.begin().await.unwrap();
            let entries = txn.scan(tree, Bound::Unbounded, Bound::Unbounded, None).await.unwrap();
            if entries.iter().all(|(_, value)| value[0] == (TRANSACTIONS - 1) as u8) && entries.len() == KEYS as usize {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the replica did not catch up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen.len() >= 2, "the replica showed {} transactions over {reads} reads", seen.len());
        let lag = replica.lag();
        // Every transaction end up to the last commit was shown (the final
        // rollback may still be on its way).
        assert!(lag.transactions >= TRANSACTIONS as usize - 1, "{lag:?}");
        let commits = TRANSACTIONS - TRANSACTIONS / 5;
        assert!(lag.commits + 1 >= commits as usize && lag.commits <= commits as usize, "{lag:?}");
        // Lag counted from the commit record's logging includes the wait for
        // durability, which lag counted from the acknowledgement does not.
        assert!(lag.logged_p50_ms > 0.0 && lag.logged_p50_ms >= lag.p50_ms, "{lag:?}");
        assert!(replica.writes_refused().await);
        replica.stop().await;
        volume.close();
    })
    .await
    .expect("test timed out");
}
