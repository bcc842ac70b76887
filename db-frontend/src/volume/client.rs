//! The tokio driver of the volume writer.
//!
//! Tasks, all bounded by the client's lifetime (aborted on close or drop):
//! - one **connection task per node**: connects (with backoff), asks each
//!   hosted segment for its status, then feeds acknowledgements and replies
//!   into the [`WriterCore`] under one mutex. Commit waiters are tokio
//!   oneshots completed from here: no thread blocks per commit.
//! - one **ticker**: lets the core retransmit to segments that went silent.
//!
//! Sending is *combined*: the writer that finds no send in progress becomes
//! the sender, ships everything queued, then looks again and ships what
//! other writers queued meanwhile, until nothing is left. A lone writer thus
//! sends its own record at once (no task hop), and under load one frame per
//! PG carries many commits (group commit on the wire). Only one sender runs
//! at a time, so frames leave in LSN order.
//!
//! Page reads go to the best segment complete at the read point; if no
//! answer comes within the hedging delay, the same read goes to a second
//! segment and the first answer wins.
//!
//! A **membership change** ([`VolumeClient::replace_segment`]) runs on the
//! caller's task: it moves the core to the joint membership, records it
//! (the caller's store, before any segment hears of it), sends the new
//! epoch to every member until a write quorum of both sets holds it, waits
//! for the joining segment to repair itself from its peers while writes go
//! on, then settles the same way. A node that joins gets a connection task
//! of its own then.
//!
//! Opening a volume always recovers it first ([`super::recovery`]): the
//! recovery core's messages go over one connection per node until it
//! decided where the log ends; the writer then starts at the new epoch and
//! opens each segment with its truncation list as the segment connects
//! (segments that were down get it when they come back).

use bytes::Bytes;
use common::ids::{Epoch, Lsn, NodeId, PageId, PgId, ReplicaIndex};
use common::limits::{DEFERRED_RECORD_BYTES_MAX, LSN_ALLOCATION_LIMIT_DEFAULT, LSN_ALLOCATION_LIMIT_MAX};
use common::message::{ErrorCode, Message, ReadPageRequest, StatusRequest};
use common::transport::{Connection, FrameSender, Transport};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::geometry::{SegmentPlacement, VolumeGeometry, WRITE_QUORUM};
use super::recovery::{RecoveredLog, RecoveryCore, RecoveryError};
use super::writer::{AllocationError, Durable, LogPoints, PageChange, SegmentView, StatusOutcome, WriterCore};

/// How often the ticker runs.
const TICK_INTERVAL: Duration = Duration::from_millis(20);
/// How often a connection repeats status requests that got no answer.
const STATUS_RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// How often recovery sends its unanswered requests again.
const RECOVERY_TICK_INTERVAL: Duration = Duration::from_millis(50);
/// First and longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How a volume client is set up.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub geometry: VolumeGeometry,
    pub lsn_allocation_limit: u64,
    /// A read unanswered for max(this, 4 x the fastest node's mean) is hedged.
    pub hedge_after_min: Duration,
    /// A read unanswered for this long fails.
    pub read_timeout: Duration,
    /// `open` fails if recovery, or opening a write quorum of every PG,
    /// takes longer than this.
    pub open_timeout: Duration,
}

impl VolumeConfig {
    pub fn new(geometry: VolumeGeometry) -> Self {
        VolumeConfig {
            geometry,
            lsn_allocation_limit: LSN_ALLOCATION_LIMIT_DEFAULT,
            hedge_after_min: Duration::from_millis(2),
            read_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a volume operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VolumeError {
    #[error(transparent)]
    Allocation(#[from] AllocationError),
    #[error("the volume client is closed")]
    Closed,
    #[error("the LSN allocation limit {limit} is above LSN_ALLOCATION_LIMIT_MAX ({LSN_ALLOCATION_LIMIT_MAX})")]
    AllocationLimitTooLarge { limit: u64 },
    #[error("recovery did not finish within {waited:?}: it waits for {waiting_for}")]
    RecoveryTimedOut { waiting_for: String, waited: Duration },
    #[error("recovery failed: {0}")]
    Recovery(#[from] RecoveryError),
    #[error(
        "a newer writer sealed the volume: this writer's epoch {epoch} is over (commits not yet acknowledged may or may not be durable)"
    )]
    Fenced { epoch: Epoch },
    #[error("{pg}: only {opened} segments were opened within {waited:?}; a write quorum is {WRITE_QUORUM}")]
    NoWriteQuorum { pg: PgId, opened: usize, waited: Duration },
    #[error("no connected segment of {pg} is known complete at read point {read_point}")]
    NoCompleteSegment { pg: PgId, read_point: Lsn },
    #[error("reading {page} at {read_point}: {reason}")]
    ReadFailed { page: PageId, read_point: Lsn, reason: String },
    #[error("membership change of {pg}: {reason}")]
    Membership { pg: PgId, reason: String },
}

/// How long each step of a membership change took.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplacementReport {
    pub pg: PgId,
    pub replaced: NodeId,
    pub incoming: NodeId,
    /// The joint epoch was on a write quorum of both member sets.
    pub joint_durable_after: Duration,
    /// The joining segment held every record durable when the change began.
    pub caught_up_after: Duration,
    /// The settled epoch was on a write quorum of the new members.
    pub settled_after: Duration,
    /// The SCL the joining segment had to reach.
    pub catch_up_target: Lsn,
}

/// A page as of a read point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRead {
    pub read_point: Lsn,
    /// LSN of the last change applied to the image (0 = never written).
    pub page_lsn: Lsn,
    pub image: Bytes,
    /// The node that answered first.
    pub served_by: NodeId,
    pub hedged: bool,
}

type ReadReply = (NodeId, Result<(Lsn, Bytes), (ErrorCode, String)>);

#[derive(Debug)]
struct Shared {
    core: Mutex<WriterCore<oneshot::Sender<()>>>,
    start: Instant,
    config: VolumeConfig,
    senders: Mutex<HashMap<NodeId, FrameSender>>,
    /// Read request id -> where its answer goes.
    reads: Mutex<HashMap<u64, mpsc::Sender<ReadReply>>>,
    next_request: AtomicU64,
    /// A task is sending queued frames (see [`send_queued`]); changed only
    /// under the core lock.
    sending: AtomicBool,
    /// [`VolumeClient::close`] ran: nothing more is logged.
    closed: AtomicBool,
    /// Signalled when VDL moves: allocations blocked on the limit retry.
    durable_advanced: Notify,
    /// Signalled when a segment answers a status request (`open` waits on it).
    status_arrived: Notify,
    transport: Arc<dyn Transport>,
    /// The connection task of every node the volume uses.
    node_links: Mutex<HashMap<NodeId, AbortHandle>>,
    /// Held from a membership step through its recording, so concurrent
    /// changes of several PGs record their geometries in order.
    membership_steps: Mutex<()>,
}

impl Shared {
    fn now_micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Wakes what an acknowledgement made durable (call without the core lock).
    fn complete(&self, durable: Durable<oneshot::Sender<()>>) {
        if durable.volume_durable_advanced {
            self.durable_advanced.notify_waiters();
        }
        for waiter in durable {
            let _ = waiter.send(());
        }
    }
}

/// When a write's records go to the segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Batching {
    /// After a moment for other writers' records to share the send.
    WaitForOthers,
    /// With a later send: the next write that sends, a durability wait
    /// ([`VolumeClient::wait_durable`]), [`VolumeClient::send_deferred`],
    /// or once `DEFERRED_RECORD_BYTES_MAX` are waiting.
    Defer,
}

/// A connected writer for one volume. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct VolumeClient {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl VolumeClient {
    /// Recovers the volume (fresh or written, after a writer's crash or
    /// not), then starts writing at the new epoch. Returns once a write
    /// quorum of every PG is open at that epoch. The time this takes does
    /// not grow with the log: recovery reads only the records above the
    /// last VDL the segments were told.
    pub async fn open(config: VolumeConfig, transport: Arc<dyn Transport>) -> Result<VolumeClient, VolumeError> {
        if config.lsn_allocation_limit > LSN_ALLOCATION_LIMIT_MAX {
            return Err(VolumeError::AllocationLimitTooLarge { limit: config.lsn_allocation_limit });
        }
        let log = recover_volume(&config, transport.clone()).await?;
        info!(epoch = %log.epoch, start = %log.start, vdl = %log.volume_durable, tail = log.records.len(),
            "volume recovered");
        let core = WriterCore::recovered(config.geometry.clone(), config.lsn_allocation_limit, log);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            start: Instant::now(),
            senders: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            sending: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            durable_advanced: Notify::new(),
            status_arrived: Notify::new(),
            config,
            transport,
            node_links: Mutex::new(HashMap::new()),
            membership_steps: Mutex::new(()),
        });
        for (node, address) in shared.config.geometry.nodes() {
            link_node(&shared, node, address);
        }
        let mut tasks = Vec::new();
        let ticker = shared.clone();
        tasks.push(tokio::spawn(async move { run_ticker(ticker).await }));
        let client = VolumeClient { shared, tasks };
        client.await_write_quorums().await?;
        let recovered = client.points().highest_allocated;
        let waited = client.shared.config.open_timeout;
        match tokio::time::timeout(waited, client.wait_durable(recovered)).await {
            Ok(result) => result?,
            Err(_) => {
                let waiting_for = format!("four acknowledgements of the records recovered up to {recovered}");
                return Err(VolumeError::RecoveryTimedOut { waiting_for, waited });
            }
        }
        info!(pgs = client.shared.config.geometry.pg_count(), "volume open");
        Ok(client)
    }

    /// Waits until a write quorum of every PG is open at this writer's epoch.
    async fn await_write_quorums(&self) -> Result<(), VolumeError> {
        let deadline = Instant::now() + self.shared.config.open_timeout;
        let pg_count = self.shared.config.geometry.pg_count();
        loop {
            let arrived = self.shared.status_arrived.notified();
            let (segments, fenced) = {
                let core = self.shared.core.lock();
                (core.segments(), core.is_fenced().then_some(core.epoch()))
            };
            if let Some(epoch) = fenced {
                return Err(VolumeError::Fenced { epoch });
            }
            let short = (0..pg_count)
                .map(|pg| (PgId(pg), segments.iter().filter(|view| view.pg == PgId(pg) && view.connected).count()))
                .find(|(_, opened)| *opened < WRITE_QUORUM);
            let Some((pg, opened)) = short else { return Ok(()) };
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(VolumeError::NoWriteQuorum { pg, opened, waited: self.shared.config.open_timeout });
            }
        }
    }

    /// This writer's epoch.
    pub fn epoch(&self) -> Epoch {
        self.shared.core.lock().epoch()
    }

    /// Where the segments are now (membership changes move them).
    pub fn geometry(&self) -> VolumeGeometry {
        self.shared.core.lock().geometry().clone()
    }

    /// Replaces the segment at `replica` of `pg` by a new one on
    /// `incoming`'s node, with the two-step joint-quorum change of A18
    /// §4.1 (see the module docs). `record` stores each new membership
    /// durably before any segment hears of it (a writer that restarts
    /// opens the volume with the last one recorded); if it fails for the
    /// joint step, the change is rolled back. Writes go on throughout.
    /// Fails after `timeout` with the PG left joint (writes still need
    /// both quorums, which is safe); call [`Self::roll_back_replacement`]
    /// or retry.
    pub async fn replace_segment(
        &self,
        pg: PgId,
        replica: ReplicaIndex,
        incoming: SegmentPlacement,
        record: &(dyn Fn(&VolumeGeometry) -> Result<(), String> + Sync),
        timeout: Duration,
    ) -> Result<ReplacementReport, VolumeError> {
        let shared = &self.shared;
        let failed = |reason: String| VolumeError::Membership { pg, reason };
        let started = Instant::now();
        let deadline = started + timeout;
        let steps = shared.membership_steps.lock();
        let (replaced, joint) = {
            let mut core = shared.core.lock();
            let replaced = core.geometry().segment(pg, replica).node;
            core.begin_replacement(pg, replica, incoming.clone()).map_err(failed)?;
            (replaced, core.geometry().clone())
        };
        if let Err(reason) = record(&joint) {
            self.shared.core.lock().end_replacement(pg, false).map_err(failed)?;
            return Err(failed(format!("recording the joint membership: {reason}")));
        }
        drop(steps);
        info!(%pg, %replica, %replaced, incoming = %incoming.node, epoch = %joint.membership(pg).epoch,
            "membership change: joint");
        link_node(shared, incoming.node, incoming.address.clone());
        let joint_durable_after = self.spread_membership(pg, deadline, |core| core.membership_durable(pg)).await?;
        let caught_up_after = self.spread_membership(pg, deadline, |core| core.replacement_may_settle(pg)).await?;
        let catch_up_target = shared.core.lock().joining_progress(pg).map_or(Lsn::ZERO, |(_, target)| target);
        let steps = shared.membership_steps.lock();
        let settled = {
            let mut core = shared.core.lock();
            core.end_replacement(pg, true).map_err(failed)?;
            core.geometry().clone()
        };
        record(&settled).map_err(|reason| failed(format!("recording the settled membership: {reason}")))?;
        drop(steps);
        let settled_after = self.spread_membership(pg, deadline, |core| core.membership_durable(pg)).await?;
        info!(%pg, epoch = %settled.membership(pg).epoch, ms = started.elapsed().as_millis() as u64,
            "membership change: settled");
        Ok(ReplacementReport {
            pg,
            replaced,
            incoming: incoming.node,
            joint_durable_after: joint_durable_after - started,
            caught_up_after: caught_up_after - started,
            settled_after: settled_after - started,
            catch_up_target,
        })
    }

    /// Rolls back a joint membership change of `pg` (the joining segment
    /// leaves) and records the result.
    pub fn roll_back_replacement(
        &self,
        pg: PgId,
        record: &(dyn Fn(&VolumeGeometry) -> Result<(), String> + Sync),
    ) -> Result<(), VolumeError> {
        let failed = |reason: String| VolumeError::Membership { pg, reason };
        let _steps = self.shared.membership_steps.lock();
        let geometry = {
            let mut core = self.shared.core.lock();
            core.end_replacement(pg, false).map_err(failed)?;
            core.geometry().clone()
        };
        record(&geometry).map_err(failed)
    }

    /// Sends the PG's current membership to every member that has not
    /// taken it, again every status interval, until `done` holds (returns
    /// when) or `deadline` passes.
    async fn spread_membership(
        &self,
        pg: PgId,
        deadline: Instant,
        done: impl Fn(&WriterCore<oneshot::Sender<()>>) -> bool,
    ) -> Result<Instant, VolumeError> {
        let shared = &self.shared;
        loop {
            let arrived = shared.status_arrived.notified();
            let requests: Vec<(NodeId, Message)> = {
                let core = shared.core.lock();
                if core.is_fenced() {
                    return Err(VolumeError::Fenced { epoch: core.epoch() });
                }
                if done(&core) {
                    return Ok(Instant::now());
                }
                core.membership_laggards(pg)
                    .into_iter()
                    .map(|slot| {
                        let request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
                        let request = core.membership_request(request_id, pg, slot);
                        (core.geometry().segment(pg, slot).node, Message::SetMembership(request))
                    })
                    .collect()
            };
            for (node, request) in requests {
                send_to(shared, node, request.encode());
            }
            let wait = deadline.min(Instant::now() + STATUS_RETRY_INTERVAL);
            if tokio::time::timeout_at(wait, arrived).await.is_err() && Instant::now() >= deadline {
                let progress = shared.core.lock().joining_progress(pg);
                return Err(VolumeError::Membership {
                    pg,
                    reason: format!("timed out (joining segment's SCL and its target: {progress:?})"),
                });
            }
        }
    }

    pub fn points(&self) -> LogPoints {
        self.shared.core.lock().points()
    }

    pub fn segments(&self) -> Vec<SegmentView> {
        self.shared.core.lock().segments()
    }

    /// Holds `point` as a read point until [`Self::release_read_point`]:
    /// garbage collection keeps every page version a read there needs.
    /// Refused (with MRPL) below MRPL, whose versions may be gone.
    pub fn hold_read_point(&self, point: Lsn) -> Result<(), Lsn> {
        self.shared.core.lock().hold_read_point(point)
    }

    pub fn release_read_point(&self, point: Lsn) {
        self.shared.core.lock().end_read(point);
    }

    /// PGCL of `pg`: the highest LSN four of its six segments completed.
    pub fn pg_complete_lsn(&self, pg: PgId) -> Lsn {
        self.shared.core.lock().pg_complete_lsn(pg)
    }

    pub fn retained_bytes(&self) -> usize {
        self.shared.core.lock().retained_bytes()
    }

    /// Logs a mini-transaction (its last record is the CPL) and returns the
    /// CPL's LSN without waiting for durability. Waits while the LSN
    /// allocation limit is reached.
    pub async fn write(&self, changes: &[PageChange]) -> Result<Lsn, VolumeError> {
        self.log(changes, None, Batching::WaitForOthers).await
    }

    /// [`Self::write`] for records nobody waits on yet (the SQL engine's
    /// changes inside a transaction): they go out with the next write that
    /// sends or the next durability wait, so a transaction's changes and
    /// its commit reach each segment in one frame and one log write,
    /// instead of one per change. At most `DEFERRED_RECORD_BYTES_MAX` bytes
    /// wait; the ticker sends any left.
    pub async fn write_deferred(&self, changes: &[PageChange]) -> Result<Lsn, VolumeError> {
        self.log(changes, None, Batching::Defer).await
    }

    /// Bytes of records deferred writes left waiting to be sent.
    pub fn unsent_bytes(&self) -> usize {
        self.shared.core.lock().unsent_bytes()
    }

    /// Sends the records deferred writes left waiting.
    pub fn send_deferred(&self) {
        if self.unsent_bytes() > 0 {
            send_queued(&self.shared);
        }
    }

    /// [`Self::write`]; with `waiter`, it is registered for the CPL's
    /// durability under the same lock as the allocation.
    async fn log(
        &self,
        changes: &[PageChange],
        waiter: Option<oneshot::Sender<()>>,
        batching: Batching,
    ) -> Result<Lsn, VolumeError> {
        let mut waiter = waiter;
        loop {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(VolumeError::Closed);
            }
            let advanced = self.shared.durable_advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            {
                let (allocated, others_in_flight, deferrable) = {
                    let mut core = self.shared.core.lock();
                    let others_in_flight = !core.all_durable();
                    let allocated = core.allocate(changes);
                    let deferrable = batching == Batching::Defer && core.unsent_bytes() < DEFERRED_RECORD_BYTES_MAX;
                    if let Ok(lsn) = &allocated
                        && let Some(waiter) = waiter.take()
                    {
                        // Not durable yet: it was only just allocated.
                        // (Handed back only if already durable: then say so.)
                        if let Some(early) = core.wait_durable(*lsn, waiter) {
                            let _ = early.send(());
                        }
                    }
                    (allocated, others_in_flight, deferrable)
                };
                match allocated {
                    Ok(lsn) if deferrable => return Ok(lsn),
                    Ok(lsn) => {
                        if !self.shared.sending.load(Ordering::Acquire) {
                            // While other commits are in flight, more writers
                            // are likely ready to run: let them queue their
                            // records first, so they share this send. A lone
                            // writer sends at once.
                            if others_in_flight && batching == Batching::WaitForOthers {
                                tokio::task::yield_now().await;
                            }
                            send_queued(&self.shared);
                        }
                        return Ok(lsn);
                    }
                    // Deferred records may be what holds VDL back.
                    Err(AllocationError::LimitReached { .. }) => self.send_deferred(),
                    Err(AllocationError::PageLsnUnknown { page }) => {
                        // Lazy redo: the page's last LSN comes with one read.
                        let read = self.read_page(page).await?;
                        self.shared.core.lock().learn_page_lsn(page, read.page_lsn);
                        continue;
                    }
                    Err(AllocationError::Fenced { epoch }) => return Err(VolumeError::Fenced { epoch }),
                    Err(other) => return Err(other.into()),
                }
            }
            advanced.await;
        }
    }

    /// Waits until VDL reaches `lsn`, sending deferred records first. While
    /// earlier records are still in flight, it yields once before sending,
    /// so other writers' transactions can queue theirs to share the send
    /// (group commit).
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), VolumeError> {
        let (unsent, in_flight) = {
            let core = self.shared.core.lock();
            (core.unsent_bytes() > 0, core.sent_in_flight())
        };
        if unsent {
            if in_flight {
                tokio::task::yield_now().await;
            }
            send_queued(&self.shared);
        }
        let (sender, receiver) = oneshot::channel();
        if self.shared.core.lock().wait_durable(lsn, sender).is_some() {
            return Ok(());
        }
        receiver.await.map_err(|_| self.waiter_dropped())
    }

    /// Logs a mini-transaction and waits until it is durable (VDL >= its CPL).
    pub async fn commit(&self, changes: &[PageChange]) -> Result<Lsn, VolumeError> {
        let (sender, receiver) = oneshot::channel();
        let lsn = self.log(changes, Some(sender), Batching::WaitForOthers).await?;
        receiver.await.map_err(|_| self.waiter_dropped())?;
        Ok(lsn)
    }

    /// Why a commit waiter was dropped: a newer writer, or the client closed.
    fn waiter_dropped(&self) -> VolumeError {
        let core = self.shared.core.lock();
        if core.is_fenced() { VolumeError::Fenced { epoch: core.epoch() } } else { VolumeError::Closed }
    }

    /// Whether a newer writer sealed the volume (see [`crate::volume::recovery`]).
    pub fn is_fenced(&self) -> bool {
        self.shared.core.lock().is_fenced()
    }

    /// Reads `page` as of the current VDL.
    pub async fn read_page(&self, page: PageId) -> Result<PageRead, VolumeError> {
        let read_point = self.shared.core.lock().begin_read();
        let result = self.read_page_at(page, read_point).await;
        self.shared.core.lock().end_read(read_point);
        result
    }

    /// Reads `page` as of `read_point`, which must be at or above MRPL.
    pub async fn read_page_at(&self, page: PageId, read_point: Lsn) -> Result<PageRead, VolumeError> {
        let shared = &self.shared;
        let failed = |reason: String| VolumeError::ReadFailed { page, read_point, reason };
        let pg = shared.config.geometry.pg_of(page).ok_or_else(|| failed("past the end of the volume".into()))?;
        let (epoch, pg_read_point, targets, hedge_after) = {
            let mut core = shared.core.lock();
            let fastest = core.fastest_read_latency().map(|micros| Duration::from_micros(4 * micros));
            let pg_read_point = core.pg_read_point(pg, read_point);
            let targets = core.read_targets(pg, pg_read_point);
            (core.epoch(), pg_read_point, targets, fastest.unwrap_or_default().max(shared.config.hedge_after_min))
        };
        if targets.is_empty() {
            return Err(VolumeError::NoCompleteSegment { pg, read_point });
        }
        let (reply_to, mut replies) = mpsc::channel(targets.len());
        let mut request_ids = Vec::new();
        let mut sent_at = HashMap::new();
        let mut remaining = targets.into_iter();
        let mut last_error = String::from("no segment answered");
        let deadline = Instant::now() + shared.config.read_timeout;
        // One read at a time, two once the first is slower than the hedging delay.
        let mut wanted = 1;
        let mut outstanding = 0;
        let result = loop {
            if outstanding < wanted
                && let Some((_, node)) = remaining.next()
            {
                let request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
                shared.reads.lock().insert(request_id, reply_to.clone());
                request_ids.push(request_id);
                let request = ReadPageRequest { request_id, pg, epoch, page, read_point: pg_read_point };
                if send_to(shared, node, Message::ReadPage(request).encode()) {
                    outstanding += 1;
                    sent_at.insert(node, Instant::now());
                } else {
                    last_error = format!("{node} is not connected");
                }
                continue;
            }
            if outstanding == 0 {
                break Err(failed(last_error));
            }
            let hedge_due = wanted == 1 && remaining.len() > 0;
            let wait_until = if hedge_due { deadline.min(Instant::now() + hedge_after) } else { deadline };
            match tokio::time::timeout_at(wait_until, replies.recv()).await {
                Ok(Some((node, Ok((page_lsn, image))))) => {
                    if let Some(sent) = sent_at.get(&node) {
                        shared.core.lock().read_latency_sample(node, sent.elapsed().as_micros() as u64);
                    }
                    break Ok(PageRead { read_point, page_lsn, image, served_by: node, hedged: wanted > 1 });
                }
                Ok(Some((node, Err((code, message))))) => {
                    debug!(%node, ?code, message, "read refused; trying another segment");
                    last_error = format!("{node}: {code:?}: {message}");
                    outstanding -= 1;
                }
                Ok(None) => break Err(VolumeError::Closed),
                Err(_) if Instant::now() >= deadline => {
                    break Err(failed(format!("no answer within {:?}", shared.config.read_timeout)));
                }
                Err(_) => {
                    // Hedge. The slow segment's node gets what it has taken so
                    // far as a latency sample, so that it stops being tried first.
                    wanted = 2;
                    let mut core = shared.core.lock();
                    for (node, sent) in &sent_at {
                        core.read_latency_sample(*node, sent.elapsed().as_micros() as u64);
                    }
                }
            }
        };
        let mut reads = shared.reads.lock();
        for request_id in request_ids {
            reads.remove(&request_id);
        }
        result
    }

    /// Stops every task. Outstanding waiters fail with [`VolumeError::Closed`].
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        for task in &self.tasks {
            task.abort();
        }
        for link in self.shared.node_links.lock().values() {
            link.abort();
        }
        self.shared.senders.lock().clear();
        // Dropped: their commits fail (they may or may not be durable).
        drop(self.shared.core.lock().take_commit_waiters());
        self.shared.durable_advanced.notify_waiters(); // allocations waiting on the limit see it
    }
}

impl Drop for VolumeClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// Queues a frame for a node; false if it is not connected or its queue is full.
fn send_to(shared: &Shared, node: NodeId, frame: Bytes) -> bool {
    let sender = shared.senders.lock().get(&node).cloned();
    sender.is_some_and(|sender| sender.try_send(frame).is_ok())
}

/// Sends everything the core has for the segments, unless another task is
/// already sending (it will pick up what is queued before it stops). A node
/// a frame could not go to is not tried again in this call: its segments
/// resend from their SCLs on a later flush (the ticker's, or the next
/// writer's), so a node that cannot take frames (gone, queue full, the
/// client closed) never keeps this loop spinning.
fn send_queued(shared: &Shared) {
    let mut outgoing = {
        let mut core = shared.core.lock();
        if shared.sending.swap(true, Ordering::AcqRel) {
            return;
        }
        core.flush(shared.now_micros())
    };
    let mut unreachable: HashSet<NodeId> = HashSet::new();
    loop {
        let closed = shared.closed.load(Ordering::Acquire);
        let failed: Vec<NodeId> = outgoing
            .drain(..)
            .filter(|out| closed || unreachable.contains(&out.node) || !send_to(shared, out.node, out.frame.clone()))
            .map(|out| out.node)
            .collect();
        let mut core = shared.core.lock();
        for node in failed {
            debug!(%node, "send failed: resending from SCL later");
            for (pg, replica) in core.geometry().segments_on(node) {
                core.resend_from_complete(pg, replica);
            }
            unreachable.insert(node);
        }
        outgoing = if closed { Vec::new() } else { core.flush(shared.now_micros()) };
        if outgoing.iter().all(|out| unreachable.contains(&out.node)) {
            for node in outgoing.iter().map(|out| out.node).collect::<HashSet<_>>() {
                for (pg, replica) in core.geometry().segments_on(node) {
                    core.resend_from_complete(pg, replica);
                }
            }
            // Cleared under the core lock: a writer that allocates after this
            // sees `false` and sends its own records.
            shared.sending.store(false, Ordering::Release);
            return;
        }
    }
}

async fn run_ticker(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let due = shared.core.lock().tick(shared.now_micros());
        if due {
            send_queued(&shared);
        }
    }
}

/// Starts the connection task of `node` unless it has one.
fn link_node(shared: &Arc<Shared>, node: NodeId, address: String) {
    let mut links = shared.node_links.lock();
    if links.contains_key(&node) || shared.closed.load(Ordering::Acquire) {
        return;
    }
    let task_shared = shared.clone();
    links.insert(node, tokio::spawn(async move { run_node_link(task_shared, node, address).await }).abort_handle());
}

/// The slot of `pg` on `node` in the current membership.
fn slot_on(shared: &Shared, pg: PgId, node: NodeId) -> Option<ReplicaIndex> {
    shared.core.lock().geometry().slot_on(pg, node)
}

/// Keeps one node connected for the client's whole life.
async fn run_node_link(shared: Arc<Shared>, node: NodeId, address: String) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        match shared.transport.connect(address.clone()).await {
            Ok(connection) => {
                backoff = RECONNECT_BACKOFF_MIN;
                debug!(%node, %address, "connected");
                serve_node_connection(&shared, node, connection).await;
                let mut core = shared.core.lock();
                for (pg, replica) in core.geometry().segments_on(node) {
                    core.segment_disconnected(pg, replica);
                }
                drop(core);
                shared.senders.lock().remove(&node);
                warn!(%node, %address, "connection to storage node lost; reconnecting");
            }
            Err(error) => debug!(%node, %address, %error, "connect failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

async fn serve_node_connection(shared: &Shared, node: NodeId, mut connection: Connection) {
    shared.senders.lock().insert(node, connection.sender.clone());
    // A segment counts as connected once its status arrives; the request (or
    // the answer) may be lost, so it is repeated until every segment answered.
    let mut ask_status = tokio::time::interval(STATUS_RETRY_INTERVAL);
    loop {
        tokio::select! {
            _ = ask_status.tick() => {
                let unanswered: Vec<PgId> = {
                    let core = shared.core.lock();
                    let hosted = core.geometry().segments_on(node);
                    hosted.into_iter().filter(|(pg, replica)| !core.is_connected(*pg, *replica)).map(|(pg, _)| pg).collect()
                };
                for pg in unanswered {
                    let request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
                    let request = Message::StatusRequest(StatusRequest { request_id, pg });
                    if connection.sender.try_send(request.encode()).is_err() {
                        return;
                    }
                }
            }
            frame = connection.receiver.recv() => {
                let Some(frame) = frame else { return };
                let decoded = frame
                    .map_err(|error| error.to_string())
                    .and_then(|frame| Message::decode(&frame).map_err(|error| error.to_string()));
                match decoded {
                    Ok(message) => handle_node_message(shared, node, message),
                    Err(reason) => {
                        warn!(%node, reason, "closing connection to storage node: bad frame");
                        return;
                    }
                }
            }
        }
    }
}

fn handle_node_message(shared: &Shared, node: NodeId, message: Message) {
    let now = shared.now_micros();
    match message {
        Message::AppendAck(ack) => {
            let Some(replica) = slot_on(shared, ack.pg, node) else { return };
            if observe_epoch(shared, node, Some(ack.epoch)) {
                return;
            }
            let durable = shared.core.lock().acknowledged(ack.pg, replica, ack.segment_complete_lsn, now);
            shared.complete(durable);
        }
        Message::Status(status) => {
            let Some(replica) = slot_on(shared, status.pg, node) else { return };
            let open_request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
            let outcome = shared.core.lock().status_received(replica, &status, open_request_id, now);
            match outcome {
                StatusOutcome::Fenced(abandoned) => fenced(shared, node, Some(status.epoch), abandoned),
                StatusOutcome::Open(request) => {
                    // Sealed at an older epoch, or not opened yet: open it
                    // with the truncation list; it answers with a status.
                    debug!(%node, pg = %status.pg, epoch = %status.epoch, "opening segment");
                    send_to(shared, node, Message::OpenEpoch(request).encode());
                    return;
                }
                StatusOutcome::SetMembership(request) => {
                    debug!(%node, pg = %status.pg, epoch = %request.membership_epoch, "sending the membership");
                    send_to(shared, node, Message::SetMembership(request).encode());
                }
                StatusOutcome::Connected(durable) => {
                    if status.needs_repair {
                        warn!(%node, pg = %status.pg, "segment reports corruption and needs repair");
                    }
                    shared.complete(durable);
                    send_queued(shared);
                }
            }
            shared.status_arrived.notify_waiters();
        }
        Message::PageImage(image) => {
            if let Some(reply) = shared.reads.lock().get(&image.request_id) {
                let _ = reply.try_send((node, Ok((image.page_lsn, image.image))));
            }
        }
        Message::Error(error) if error.code == ErrorCode::StaleEpoch => {
            let read = shared.reads.lock().get(&error.request_id).cloned();
            match read {
                Some(reply) => {
                    let _ = reply.try_send((node, Err((error.code, error.message))));
                }
                None => {
                    observe_epoch(shared, node, None);
                }
            }
        }
        Message::Error(error) if error.code == ErrorCode::UnknownSegment => {
            let read = shared.reads.lock().get(&error.request_id).cloned();
            if let Some(reply) = read {
                let _ = reply.try_send((node, Err((error.code, error.message))));
            } else if let Some(slot) = slot_on(shared, error.pg, node) {
                // A joining segment not placed yet (or lost with a restart
                // that did not list it): the membership places it.
                let request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
                let request = shared.core.lock().membership_request(request_id, error.pg, slot);
                send_to(shared, node, Message::SetMembership(request).encode());
            }
        }
        Message::Error(error) if error.request_id != 0 => {
            if let Some(reply) = shared.reads.lock().get(&error.request_id) {
                let _ = reply.try_send((node, Err((error.code, error.message))));
            } else {
                warn!(%node, pg = %error.pg, code = ?error.code, message = error.message, "request refused");
            }
        }
        Message::Error(error) if error.code == ErrorCode::NotOpen => {
            // The segment lost its open state (it restarted before the list
            // was durable): ask again, which opens it again.
            if let Some(replica) = slot_on(shared, error.pg, node) {
                shared.core.lock().segment_disconnected(error.pg, replica);
            }
        }
        Message::Error(error) => {
            warn!(%node, pg = %error.pg, code = ?error.code, message = error.message, "append refused");
            if let Some(replica) = slot_on(shared, error.pg, node) {
                shared.core.lock().resend_from_complete(error.pg, replica);
            }
        }
        other => warn!(%node, ?other, "unexpected message from a storage node"),
    }
}

/// A segment on `node` answered with `epoch` (`None`: it refused ours as
/// stale). Returns whether this writer is fenced: a newer writer sealed
/// the volume, and the commits still waiting fail (dropped waiters).
fn observe_epoch(shared: &Shared, node: NodeId, epoch: Option<Epoch>) -> bool {
    let mut core = shared.core.lock();
    let abandoned = core.observe_epoch(epoch);
    let is_fenced = core.is_fenced();
    drop(core);
    if let Some(abandoned) = abandoned {
        fenced(shared, node, epoch, abandoned);
    }
    is_fenced
}

/// This writer was just fenced: its waiting commits fail with `Fenced`.
fn fenced(shared: &Shared, node: NodeId, epoch: Option<Epoch>, abandoned: Vec<oneshot::Sender<()>>) {
    if !abandoned.is_empty() {
        warn!(%node, ?epoch, abandoned = abandoned.len(), "a newer writer recovered the volume: this writer is fenced");
    }
    drop(abandoned); // their commits fail with `Fenced`
    shared.durable_advanced.notify_waiters(); // allocations waiting on the limit see it
}

/// Runs the recovery core over one connection per node until it decided
/// (or `config.open_timeout` passed).
async fn recover_volume(config: &VolumeConfig, transport: Arc<dyn Transport>) -> Result<RecoveredLog, VolumeError> {
    // Racing recoveries must draw different epoch offsets.
    let random = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), Instant::now());
    let mut core = RecoveryCore::new(config.geometry.clone(), random);
    let (inbox, mut arrived) = mpsc::unbounded_channel();
    let mut outboxes = HashMap::new();
    let mut relays = tokio::task::JoinSet::new();
    for (node, address) in config.geometry.nodes() {
        let (outbox, outgoing) = mpsc::unbounded_channel();
        outboxes.insert(node, outbox);
        relays.spawn(relay(transport.clone(), node, address, outgoing, inbox.clone()));
    }
    drop(inbox);
    let send = |messages: Vec<(NodeId, Message)>| {
        for (node, message) in messages {
            if let Some(outbox) = outboxes.get(&node) {
                let _ = outbox.send(message);
            }
        }
    };
    send(core.start());
    let deadline = Instant::now() + config.open_timeout;
    let mut tick = tokio::time::interval(RECOVERY_TICK_INTERVAL);
    tick.tick().await;
    loop {
        if let Some(result) = core.take_result() {
            relays.abort_all();
            return result.map_err(VolumeError::from);
        }
        tokio::select! {
            _ = tick.tick() => send(core.tick()),
            message = arrived.recv() => match message {
                Some((node, message)) => send(core.receive(node, message)),
                None => return Err(VolumeError::Closed),
            },
            _ = tokio::time::sleep_until(deadline) => {
                relays.abort_all();
                return Err(VolumeError::RecoveryTimedOut { waiting_for: core.waiting_for(), waited: config.open_timeout });
            }
        }
    }
}

/// Carries recovery's messages to one node and its answers back,
/// reconnecting until aborted. Messages sent while it is not connected are
/// lost; the core sends what stays unanswered again.
async fn relay(
    transport: Arc<dyn Transport>,
    node: NodeId,
    address: String,
    mut outgoing: mpsc::UnboundedReceiver<Message>,
    answers: mpsc::UnboundedSender<(NodeId, Message)>,
) {
    loop {
        let mut connection = match transport.connect(address.clone()).await {
            Ok(connection) => connection,
            Err(error) => {
                debug!(%node, %error, "recovery: connect failed");
                tokio::time::sleep(RECONNECT_BACKOFF_MIN).await;
                while outgoing.try_recv().is_ok() {}
                continue;
            }
        };
        loop {
            tokio::select! {
                message = outgoing.recv() => {
                    let Some(message) = message else { return };
                    if connection.sender.try_send(message.encode()).is_err() {
                        break;
                    }
                }
                frame = connection.receiver.recv() => {
                    let Some(Ok(frame)) = frame else { break };
                    match Message::decode(&frame) {
                        Ok(message) => {
                            if answers.send((node, message)).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            warn!(%node, %error, "recovery: closing connection: bad message");
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_BACKOFF_MIN).await;
    }
}
