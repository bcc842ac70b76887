//! The volume writer's bookkeeping, without I/O.
//!
//! - `quorum/...`: [`QuorumTracker`]: `record_allocated` for a round of
//!   records spread over the PGs (a consistency point every 4th record), then
//!   `segment_acknowledged` from all 6 replicas of every PG that got records.
//!   `batch_1` acknowledges every record on its own (the worst case),
//!   `batch_64` acknowledges 64 records at a time (group commit).
//! - `writer/...`: [`WriterCore`]: `allocate` of 16 mini-transactions of 4
//!   small (32-byte) page writes each, then `flush` into append frames for all
//!   six segments of every PG. `allocate_flush` times only that (the segments'
//!   acknowledgements that free the retained records run untimed);
//!   `allocate_flush_ack` also times the 6 acknowledgements per PG.
//!
//! Run: `cargo bench --bench quorum`.

use bytes::Bytes;
use common::ids::{AzId, Epoch, Lsn, NodeId, PageId, PgId, ReplicaIndex};
use common::redo::PageOp;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use db_frontend::volume::geometry::{ClusterConfig, NodeSpec, SEGMENTS_PER_PG, VolumeGeometry};
use db_frontend::volume::quorum::QuorumTracker;
use db_frontend::volume::writer::{PageChange, WriterCore};
use std::hint::black_box;
use std::time::{Duration, Instant};

const PG_COUNTS: [u32; 2] = [1, 16];
const QUORUM_BATCHES: [usize; 2] = [1, 64];
const RECORDS_PER_MINI_TRANSACTION: usize = 4;
const MINI_TRANSACTIONS_PER_ROUND: usize = 16;
const WRITE_BYTES: usize = 32;
const PAGE_BYTES: usize = 8192;
const PG_BYTES: u64 = 64 * 1024 * 1024;
/// Distinct pages written per PG, so the writer's page map stays bounded.
const PAGES_PER_PG_USED: u64 = 1024;

/// Allocates rounds of records and acknowledges them from every replica.
#[derive(Debug)]
struct QuorumDriver {
    tracker: QuorumTracker,
    pg_count: u32,
    next_lsn: Lsn,
    last_of_pg: Vec<Lsn>,
}

impl QuorumDriver {
    fn new(pg_count: u32) -> Self {
        QuorumDriver {
            tracker: QuorumTracker::new(pg_count, Lsn::ZERO),
            pg_count,
            next_lsn: Lsn::FIRST,
            last_of_pg: vec![Lsn::ZERO; pg_count as usize],
        }
    }

    fn round(&mut self, batch: usize) -> Lsn {
        let mut touched = Vec::with_capacity(batch.min(self.pg_count as usize));
        for _ in 0..batch {
            let lsn = self.next_lsn;
            self.next_lsn = lsn.next();
            let pg = PgId((lsn.0 % u64::from(self.pg_count)) as u32);
            let consistency_point = lsn.0.is_multiple_of(RECORDS_PER_MINI_TRANSACTION as u64);
            self.tracker.record_allocated(lsn, pg, consistency_point);
            if self.last_of_pg[pg.0 as usize] <= self.tracker.pg_complete_lsn(pg) {
                touched.push(pg);
            }
            self.last_of_pg[pg.0 as usize] = lsn;
        }
        for pg in touched {
            let complete = self.last_of_pg[pg.0 as usize];
            for replica in 0..SEGMENTS_PER_PG {
                black_box(self.tracker.segment_acknowledged(pg, ReplicaIndex(replica as u8), complete));
            }
        }
        self.tracker.volume_durable_lsn()
    }
}

fn quorum(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("quorum");
    for batch in QUORUM_BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        for pg_count in PG_COUNTS {
            let mut driver = QuorumDriver::new(pg_count);
            group.bench_function(BenchmarkId::new(format!("batch_{batch}"), format!("pgs_{pg_count}")), |bencher| {
                bencher.iter(|| driver.round(black_box(batch)))
            });
        }
    }
    group.finish();
}

fn geometry(pg_count: u32) -> VolumeGeometry {
    let nodes =
        (0..6).map(|id| NodeSpec { id: NodeId(id), az: AzId((id / 2) as u8), address: format!("node-{id}") }).collect();
    VolumeGeometry::place(&ClusterConfig { nodes }, pg_count, PG_BYTES, PAGE_BYTES).expect("valid geometry")
}

/// A writer whose segments are all connected and acknowledge everything.
#[derive(Debug)]
struct WriterDriver {
    writer: WriterCore<u32>,
    pg_count: u32,
    pages_per_pg: u64,
    next_change: u64,
    last_of_pg: Vec<Lsn>,
    data: Bytes,
    now_micros: u64,
}

impl WriterDriver {
    fn new(pg_count: u32) -> Self {
        let geometry = geometry(pg_count);
        let pages_per_pg = geometry.pages_per_pg();
        let mut writer = WriterCore::new(geometry, Epoch::INITIAL, common::limits::LSN_ALLOCATION_LIMIT_DEFAULT);
        for pg in 0..pg_count {
            for replica in 0..SEGMENTS_PER_PG {
                writer.segment_connected(PgId(pg), ReplicaIndex(replica as u8), Lsn::ZERO, 0);
            }
        }
        WriterDriver {
            writer,
            pg_count,
            pages_per_pg,
            next_change: 0,
            last_of_pg: vec![Lsn::ZERO; pg_count as usize],
            data: Bytes::from(vec![0xa5; WRITE_BYTES]),
            now_micros: 0,
        }
    }

    /// The next mini-transaction's changes: consecutive changes go to
    /// consecutive PGs, cycling over a bounded set of pages in each.
    fn next_changes(&mut self) -> Vec<PageChange> {
        (0..RECORDS_PER_MINI_TRANSACTION)
            .map(|_| {
                let change = self.next_change;
                self.next_change += 1;
                let pg = change % u64::from(self.pg_count);
                let page = pg * self.pages_per_pg + (change / u64::from(self.pg_count)) % PAGES_PER_PG_USED;
                let offset = ((change * WRITE_BYTES as u64) % (PAGE_BYTES - WRITE_BYTES) as u64) as u32;
                PageChange { page: PageId(page), op: PageOp::Write { offset, data: self.data.clone() } }
            })
            .collect()
    }

    /// Allocates one round of mini-transactions and flushes it; returns the frames sent.
    fn allocate_and_flush(&mut self, rounds: &[Vec<PageChange>]) -> usize {
        for changes in rounds {
            let last = self.writer.allocate(changes).expect("allocation within the limit");
            for (index, change) in changes.iter().enumerate() {
                let lsn = Lsn(last.0 + 1 + index as u64 - changes.len() as u64);
                let pg = (change.page.0 / self.pages_per_pg) as usize;
                self.last_of_pg[pg] = self.last_of_pg[pg].max(lsn);
            }
        }
        self.now_micros += 1;
        self.writer.flush(self.now_micros).len()
    }

    /// Every segment acknowledges everything it was sent.
    fn acknowledge_all(&mut self) {
        for (pg, &complete) in self.last_of_pg.iter().enumerate() {
            for replica in 0..SEGMENTS_PER_PG {
                black_box(self.writer.acknowledged(
                    PgId(pg as u32),
                    ReplicaIndex(replica as u8),
                    complete,
                    self.now_micros,
                ));
            }
        }
    }

    fn next_round(&mut self) -> Vec<Vec<PageChange>> {
        (0..MINI_TRANSACTIONS_PER_ROUND).map(|_| self.next_changes()).collect()
    }
}

fn writer(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("writer");
    group.throughput(Throughput::Elements((MINI_TRANSACTIONS_PER_ROUND * RECORDS_PER_MINI_TRANSACTION) as u64));
    for pg_count in PG_COUNTS {
        for (name, timed_acks) in [("allocate_flush", false), ("allocate_flush_ack", true)] {
            let mut driver = WriterDriver::new(pg_count);
            group.bench_function(BenchmarkId::new(name, format!("pgs_{pg_count}")), |bencher| {
                bencher.iter_custom(|iterations| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iterations {
                        let round = driver.next_round();
                        let start = Instant::now();
                        black_box(driver.allocate_and_flush(&round));
                        if !timed_acks {
                            elapsed += start.elapsed();
                        }
                        driver.acknowledge_all();
                        if timed_acks {
                            elapsed += start.elapsed();
                        }
                    }
                    assert_eq!(driver.writer.retained_bytes(), 0, "every record was acknowledged by every segment");
                    elapsed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, quorum, writer);
criterion_main!(benches);
