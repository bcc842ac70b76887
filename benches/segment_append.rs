//! The segment's foreground write path on a real disk, std files vs io_uring.
//!
//! Each iteration hands one append of `batch` 4 KiB records to a
//! [`SegmentCore`] and drives its actions until the segment is idle again:
//! append -> log write -> fdatasync -> `write_done` -> ack. The time is the
//! steady-state cost per batch: it also carries the background page-version
//! writes that coalescing issues every few batches (the writer's VDL and
//! minimum read point follow SCL, as in a healthy cluster, so memory stays
//! bounded), which both backends pay alike. At batch 64 a segment fills a
//! 64 MiB log file in well under a second, so the time also carries log-file
//! rolls, which wait for the (paced) background zero-fill of the next file.
//!
//! The `log_disk` group isolates the backends: the same write sizes go
//! straight to `LogDisk::write_durable`, round-robin over part of one
//! preallocated log file, so no segment logic, coalescing or log-file
//! preparation (the background zero-fill of the next 64 MiB file, which a
//! segment at batch 64 needs every fraction of a second) is in the numbers.
//!
//! Both backends run behind the same `LogDisk` trait the node uses:
//! `std/...` is `StdFileDisk` (a worker thread doing `pwrite` + `fdatasync`),
//! `io_uring/...` is `UringDisk` on one `UringRing` (linked write + fsync SQEs).
//! Compare `<group>/std/batch_N` with `<group>/io_uring/batch_N`. fdatasync
//! latency on shared or virtual disks drifts over time: rerun before trusting
//! a small difference.
//!
//! Logs go to a temporary directory under `$LAB_BENCH_DIR` (default: the
//! system temp dir). It must be a real disk: on tmpfs fdatasync is free.
//!
//! Run: `cargo bench --bench segment_append`.

use bytes::Bytes;
use common::ids::{Epoch, Lsn, MembershipEpoch, PageId, PgId};
use common::message::AppendRequest;
use common::redo::{PageOp, RecordFields, RedoRecord};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};
use storage_node::disk::{LogDisk, StdFileDisk, UringDisk, UringRing};
use storage_node::log_format::{LogPosition, redo_entry_bytes};
use storage_node::segment::{Action, LogWrite, ReplyTo, SegmentConfig, SegmentCore};
use tempfile::TempDir;

const PG: PgId = PgId(0);
const PAGE_BYTES: usize = 8192;
const RECORD_DATA_BYTES: usize = 4096;
/// Pages the records cycle over: few enough that coalescing and garbage
/// collection keep the segment's memory bounded during a long run.
const PAGES: u64 = 16;
const BATCH_SIZES: [usize; 2] = [1, 64];
const CONNECTION: ReplyTo = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Std,
    IoUring,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Std => "std",
            Backend::IoUring => "io_uring",
        }
    }
}

fn bench_directory() -> io::Result<TempDir> {
    let base = std::env::var_os("LAB_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new().prefix("lab-segment-append-").tempdir_in(base)
}

/// A `LogDisk` used synchronously: each write blocks until it is durable.
#[derive(Debug)]
struct SyncDisk {
    disk: Box<dyn LogDisk>,
    completions: Receiver<io::Result<()>>,
    completion_sender: Sender<io::Result<()>>,
}

impl SyncDisk {
    fn open(backend: Backend, ring: Option<&Arc<UringRing>>, directory: &Path, file_bytes: u64) -> io::Result<Self> {
        let disk: Box<dyn LogDisk> = match (backend, ring) {
            (Backend::Std, _) => Box::new(StdFileDisk::open(directory, file_bytes)?),
            (Backend::IoUring, Some(ring)) => Box::new(UringDisk::open(directory, file_bytes, ring.clone())?),
            (Backend::IoUring, None) => return Err(io::Error::other("io_uring backend without a ring")),
        };
        let (completion_sender, completions) = channel();
        Ok(SyncDisk { disk, completions, completion_sender })
    }

    fn write(&self, write: LogWrite) {
        let sender = self.completion_sender.clone();
        let done = Box::new(move |result: io::Result<()>| {
            // The bench thread waits on the receiver, which outlives the disk.
            let _ = sender.send(result);
        });
        let result = match self.disk.write_durable(write, done) {
            Some(result) => result,
            None => self.completions.recv().expect("the disk reports every write"),
        };
        if let Err(error) = result {
            panic!("log write failed: {error}");
        }
    }
}

/// One segment on a real disk, driven synchronously from the bench thread.
#[derive(Debug)]
struct DiskSegment {
    core: SegmentCore,
    disk: SyncDisk,
    last_lsn: Lsn,
    last_page_lsn: HashMap<PageId, Lsn>,
    data: Bytes,
    /// Last field: removed only after the disk (and its threads) are gone.
    _directory: TempDir,
}

impl DiskSegment {
    fn open(backend: Backend, ring: Option<&Arc<UringRing>>) -> io::Result<DiskSegment> {
        let directory = bench_directory()?;
        let config = SegmentConfig::new(PG, PAGE_BYTES, 1 << 20);
        let disk = SyncDisk::open(backend, ring, directory.path(), config.log_file_bytes)?;
        let (core, actions) = SegmentCore::create_open(config, Epoch::INITIAL).map_err(io::Error::other)?;
        let mut segment = DiskSegment {
            core,
            disk,
            last_lsn: Lsn::ZERO,
            last_page_lsn: HashMap::new(),
            data: Bytes::from(vec![0x5a; RECORD_DATA_BYTES]),
            _directory: directory,
        };
        // The first write creates (zero-fills) log file 1 before timing starts.
        assert!(!segment.drive(actions), "nothing to acknowledge at creation");
        Ok(segment)
    }

    /// The next `batch` records, linked as the volume writer links them.
    fn next_request(&mut self, batch: usize) -> AppendRequest {
        let complete = self.core.segment_complete_lsn();
        let records: Vec<RedoRecord> = (0..batch)
            .map(|_| {
                let lsn = self.last_lsn.next();
                let page = PageId(lsn.0 % PAGES);
                let record = RecordFields {
                    lsn,
                    prev_volume_lsn: self.last_lsn,
                    prev_segment_lsn: self.last_lsn,
                    prev_page_lsn: self.last_page_lsn.insert(page, lsn).unwrap_or(Lsn::ZERO),
                    page,
                    pg: PG,
                    consistency_point: true,
                    op: PageOp::Write { offset: 0, data: self.data.clone() },
                }
                .seal();
                self.last_lsn = lsn;
                record
            })
            .collect();
        // A healthy writer: everything acknowledged so far is durable and read.
        AppendRequest {
            pg: PG,
            epoch: Epoch::INITIAL,
            volume_durable_lsn: complete,
            min_read_point: complete,
            membership_epoch: MembershipEpoch::INITIAL,
            records,
        }
    }

    /// Carries out `actions` and their follow-ups until the segment is idle.
    /// Returns whether our connection was acknowledged.
    fn drive(&mut self, actions: Vec<Action>) -> bool {
        let mut acknowledged = false;
        let mut pending = actions;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for action in pending {
                match action {
                    Action::Write(write) => {
                        let id = write.id;
                        self.disk.write(write);
                        next.extend(self.core.write_done(id));
                    }
                    Action::Ack { to, .. } => acknowledged |= to == CONNECTION,
                    Action::Refuse { error, .. } => panic!("segment refused the append: {error:?}"),
                    Action::Status { status, .. } => panic!("no seal was asked, yet one was answered: {status:?}"),
                    Action::DeleteFile(file) => {
                        if let Err(error) = self.disk.disk.delete_file(file) {
                            panic!("could not delete log file {file}: {error}");
                        }
                    }
                }
            }
            pending = next;
        }
        acknowledged
    }

    fn append(&mut self, request: AppendRequest) -> bool {
        let actions = self.core.append(request, CONNECTION);
        self.drive(actions)
    }
}

/// A bare `LogDisk` writing the log write a segment would issue for one
/// batch, round-robin over the first quarter of one preallocated log file
/// (below the point where `LogFiles` starts zero-filling the next file).
#[derive(Debug)]
struct RawDisk {
    disk: SyncDisk,
    wrap_bytes: u64,
    offset: u64,
    next_id: u64,
    bytes: Bytes,
    /// Last field: removed only after the disk (and its threads) are gone.
    _directory: TempDir,
}

impl RawDisk {
    fn open(backend: Backend, ring: Option<&Arc<UringRing>>, batch: usize) -> io::Result<RawDisk> {
        let directory = bench_directory()?;
        let file_bytes = SegmentConfig::new(PG, PAGE_BYTES, 1 << 20).log_file_bytes;
        let disk = SyncDisk::open(backend, ring, directory.path(), file_bytes)?;
        let wrap_bytes = file_bytes / 4;
        let write_bytes = redo_entry_bytes(batch * record_encoded_bytes() as usize);
        let mut raw = RawDisk {
            disk,
            wrap_bytes,
            offset: 0,
            next_id: 1,
            bytes: Bytes::from(vec![0xa5; write_bytes]),
            _directory: directory,
        };
        // Creates (zero-fills) log file 1 before timing starts.
        raw.write();
        Ok(raw)
    }

    fn write(&mut self) {
        if self.offset + self.bytes.len() as u64 > self.wrap_bytes {
            self.offset = 0;
        }
        let write = LogWrite {
            id: self.next_id,
            position: LogPosition { file: 1, offset: self.offset },
            bytes: self.bytes.clone(),
        };
        self.next_id += 1;
        self.offset += self.bytes.len() as u64;
        self.disk.write(write);
    }
}

fn record_encoded_bytes() -> u64 {
    let fields = RecordFields {
        lsn: Lsn::FIRST,
        prev_volume_lsn: Lsn::ZERO,
        prev_segment_lsn: Lsn::ZERO,
        prev_page_lsn: Lsn::ZERO,
        page: PageId(0),
        pg: PG,
        consistency_point: true,
        op: PageOp::Write { offset: 0, data: Bytes::from(vec![0; RECORD_DATA_BYTES]) },
    };
    fields.encoded_len() as u64
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
}

fn disk_benches(criterion: &mut Criterion) {
    let ring = match UringRing::start() {
        Ok(ring) => Some(ring),
        Err(error) => {
            eprintln!("io_uring unavailable ({error}): benchmarking the std backend only");
            None
        }
    };
    let backends: Vec<Backend> = [Backend::Std, Backend::IoUring]
        .into_iter()
        .filter(|backend| *backend == Backend::Std || ring.is_some())
        .collect();

    let mut group = criterion.benchmark_group("log_disk");
    configure(&mut group);
    for batch in BATCH_SIZES {
        group.throughput(Throughput::Bytes(batch as u64 * record_encoded_bytes()));
        for &backend in &backends {
            let mut raw = match RawDisk::open(backend, ring.as_ref(), batch) {
                Ok(raw) => raw,
                Err(error) => panic!("could not set up a {} log disk: {error}", backend.name()),
            };
            group.bench_function(BenchmarkId::new(backend.name(), format!("batch_{batch}")), |bencher| {
                bencher.iter(|| raw.write())
            });
        }
    }
    group.finish();

    let mut group = criterion.benchmark_group("segment_append");
    configure(&mut group);
    for batch in BATCH_SIZES {
        group.throughput(Throughput::Bytes(batch as u64 * record_encoded_bytes()));
        for &backend in &backends {
            let mut segment = match DiskSegment::open(backend, ring.as_ref()) {
                Ok(segment) => segment,
                Err(error) => panic!("could not set up a {} segment: {error}", backend.name()),
            };
            group.bench_function(BenchmarkId::new(backend.name(), format!("batch_{batch}")), |bencher| {
                bencher.iter_custom(|iterations| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iterations {
                        let request = segment.next_request(batch);
                        let last = segment.last_lsn;
                        let start = Instant::now();
                        let acknowledged = segment.append(request);
                        elapsed += start.elapsed();
                        assert!(acknowledged, "the append was not acknowledged");
                        assert_eq!(segment.core.segment_complete_lsn(), last, "SCL did not reach the batch");
                    }
                    elapsed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, disk_benches);
criterion_main!(benches);
