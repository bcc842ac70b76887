//! Wire-frame costs: the bare frame codec (`encode_frame` / `decode_frame`,
//! dominated by CRC32C and one copy) and the storage append message on top of
//! it (`encode_append_frame` from already-encoded records, and
//! `decode_frame` + `Message::decode`, which checks every record's CRC).
//!
//! Run: `cargo bench --bench frames`.

use bytes::{Bytes, BytesMut};
use common::frame::{decode_frame, encode_frame};
use common::ids::{Epoch, Lsn, MembershipEpoch, PageId, PgId};
use common::message::{AppendHeader, Message, MessageKind, encode_append_frame};
use common::redo::{PageOp, RecordFields};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// Bytes of a record body: the 4-byte write offset plus 96 data bytes.
const RECORD_BODY_BYTES: usize = 100;
const PAYLOAD_SIZES: [usize; 3] = [64, 4096, 64 * 1024];
const APPEND_RECORD_COUNTS: [usize; 3] = [1, 16, 256];

/// `count` sealed records of one PG, each a 100-byte-body write to its own page,
/// linked the way the volume writer links them.
fn encoded_records(count: usize) -> Vec<Bytes> {
    (1..=count as u64)
        .map(|lsn| {
            RecordFields {
                lsn: Lsn(lsn),
                prev_volume_lsn: Lsn(lsn - 1),
                prev_segment_lsn: Lsn(lsn - 1),
                prev_page_lsn: Lsn::ZERO,
                page: PageId(lsn),
                pg: PgId(0),
                consistency_point: true,
                op: PageOp::Write { offset: 0, data: Bytes::from(vec![lsn as u8; RECORD_BODY_BYTES - 4]) },
            }
            .seal()
            .encoded
        })
        .collect()
}

fn encode_append(records: &[Bytes]) -> Bytes {
    let header = AppendHeader {
        pg: PgId(0),
        epoch: Epoch::INITIAL,
        volume_durable_lsn: Lsn(0),
        min_read_point: Lsn(0),
        membership_epoch: MembershipEpoch::INITIAL,
    };
    encode_append_frame(header, records.iter().map(|record| &record[..]))
}

fn frame_codec(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("frame");
    for size in PAYLOAD_SIZES {
        let payload: Vec<u8> = (0..size).map(|index| index as u8).collect();
        let encoded = encode_frame(MessageKind::Append as u8, &payload);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |bencher, payload| {
            bencher.iter(|| encode_frame(black_box(MessageKind::Append as u8), black_box(payload)))
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |bencher, encoded| {
            bencher.iter_batched(
                || BytesMut::from(&encoded[..]),
                |mut buffer| decode_frame(black_box(&mut buffer)).expect("valid frame").expect("complete frame"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn append_message(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("append_frame");
    for count in APPEND_RECORD_COUNTS {
        let records = encoded_records(count);
        let encoded = encode_append(&records);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", format!("{count}_records")), &records, |bencher, records| {
            bencher.iter(|| encode_append(black_box(records)))
        });
        group.bench_with_input(BenchmarkId::new("decode", format!("{count}_records")), &encoded, |bencher, encoded| {
            bencher.iter_batched(
                || BytesMut::from(&encoded[..]),
                |mut buffer| {
                    let frame = decode_frame(black_box(&mut buffer)).expect("valid frame").expect("complete frame");
                    match Message::decode(&frame).expect("valid append") {
                        Message::Append(append) => append,
                        other => panic!("expected an append, got {other:?}"),
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, frame_codec, append_message);
criterion_main!(benches);
