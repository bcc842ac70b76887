//! Page materialization cost against the length of the page's redo chain.
//!
//! One segment (on the in-memory disk, writes completed synchronously) holds
//! four pages whose chains are 1, 8, 32 and 128 records long, interleaved in
//! the log as a real workload would leave them. Coalescing is kept out of the
//! way (a huge `coalesce_chain_records`, and a writer VDL of 0 that bounds
//! coalescing anyway), so `read_page` at SCL starts from a zero page and
//! applies the whole chain: a lookup of every record plus one copy each.
//!
//! Run: `cargo bench --bench materialize`.

use bytes::Bytes;
use common::ids::{Epoch, Lsn, MembershipEpoch, PageId, PgId};
use common::message::AppendRequest;
use common::redo::{PageOp, RecordFields, RedoRecord};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use storage_node::disk::MemoryDisk;
use storage_node::segment::{Action, SegmentConfig, SegmentCore};

const PG: PgId = PgId(0);
const PAGE_BYTES: usize = 8192;
const RECORD_DATA_BYTES: usize = 128;
const CHAIN_LENGTHS: [usize; 4] = [1, 8, 32, 128];

/// Runs actions against a memory disk until none are left.
fn complete_all(core: &mut SegmentCore, disk: &MemoryDisk, actions: Vec<Action>) {
    disk.run_until_idle(core, actions, |action| {
        if let Action::Refuse { error, .. } = action {
            panic!("segment refused the append: {error:?}");
        }
    });
}

/// A segment holding page `index + 1` with a chain of `CHAIN_LENGTHS[index]`
/// records, and the LSN of each page's last record.
fn build_segment() -> (SegmentCore, Vec<(PageId, usize, Lsn)>) {
    let config = SegmentConfig { coalesce_chain_records: usize::MAX, ..SegmentConfig::new(PG, PAGE_BYTES, 1 << 20) };
    let (mut core, actions) = SegmentCore::create_open(config, Epoch::INITIAL).expect("valid segment config");
    let disk = MemoryDisk::new();
    complete_all(&mut core, &disk, actions);

    let pages: Vec<PageId> = (1..=CHAIN_LENGTHS.len() as u64).map(PageId).collect();
    let mut last_page_lsn = vec![Lsn::ZERO; pages.len()];
    let mut last_lsn = Lsn::ZERO;
    let mut records: Vec<RedoRecord> = Vec::new();
    let longest = CHAIN_LENGTHS.iter().copied().max().unwrap_or(0);
    for round in 0..longest {
        for (index, (&page, &length)) in pages.iter().zip(&CHAIN_LENGTHS).enumerate() {
            if round >= length {
                continue;
            }
            let lsn = last_lsn.next();
            let offset = (round * RECORD_DATA_BYTES) % (PAGE_BYTES - RECORD_DATA_BYTES);
            records.push(
                RecordFields {
                    lsn,
                    prev_volume_lsn: last_lsn,
                    prev_segment_lsn: last_lsn,
                    prev_page_lsn: last_page_lsn[index],
                    page,
                    pg: PG,
                    consistency_point: true,
                    op: PageOp::Write {
                        offset: offset as u32,
                        data: Bytes::from(vec![round as u8; RECORD_DATA_BYTES]),
                    },
                }
                .seal(),
            );
            last_page_lsn[index] = lsn;
            last_lsn = lsn;
        }
    }
    let request = AppendRequest {
        pg: PG,
        epoch: Epoch::INITIAL,
        volume_durable_lsn: Lsn::ZERO,
        min_read_point: Lsn::ZERO,
        membership_epoch: MembershipEpoch::INITIAL,
        records,
    };
    let actions = core.append(request, 1);
    complete_all(&mut core, &disk, actions);
    assert_eq!(core.segment_complete_lsn(), last_lsn, "every record is durable and linked");
    let chains = pages.into_iter().zip(CHAIN_LENGTHS).zip(last_page_lsn).map(|((p, n), l)| (p, n, l)).collect();
    (core, chains)
}

fn materialize(criterion: &mut Criterion) {
    let (core, chains) = build_segment();
    let read_point = core.segment_complete_lsn();
    let mut group = criterion.benchmark_group("materialize");
    for (page, length, last) in chains {
        let (page_lsn, _) = core.read_page(page, read_point, Epoch::INITIAL).expect("page is readable at SCL");
        assert_eq!(page_lsn, last, "the whole chain of {page} is applied");
        group.throughput(Throughput::Elements(length as u64));
        group.bench_with_input(BenchmarkId::new("read_page", format!("chain_{length}")), &page, |bencher, page| {
            bencher.iter(|| {
                core.read_page(black_box(*page), black_box(read_point), Epoch::INITIAL).expect("page is readable")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, materialize);
criterion_main!(benches);
