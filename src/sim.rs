//! `lab sim`: a seeded, deterministic simulation of the redo protocol. It
//! drives the real cores: one [`WriterCore`] and the [`SegmentCore`]s of six
//! storage nodes (two PGs), with no threads, sockets or clocks.
//!
//! - **Network:** every message is delayed by a random amount (so messages
//!   reorder), and may be dropped or duplicated; a node may be cut off for
//!   a while (a partition).
//! - **Disk:** each segment's log write becomes durable only when its
//!   completion event runs. A node that crashes loses the writes still in
//!   flight, then restarts from its memory disk (`scan_log`,
//!   `SegmentCore::recover`). At most two nodes are down or cut off at once.
//! - **Sealing:** in some runs a recovering writer seals the volume at epoch
//!   2 on a write quorum of every PG (`SealEpoch`), and the old writer must
//!   be fenced.
//!
//! Checked on every step:
//! - the writer's PGCL of each PG is backed by four real SCLs (the fourth
//!   highest SCL of its six segments, durable on their disks);
//! - HA (highest allocated), VCL and VDL only move forward, and so does
//!   every segment's SCL, across restarts too;
//! - a segment never takes an append of an epoch older than its own;
//! - once a seal holds, the old writer's PGCL of each PG is at most the
//!   second-highest SCL the seal's answers reported (any four segments that
//!   made a record durable meet the sealed four in two): recovery sees
//!   every commit the old writer acknowledged.
//!
//! At the end the network heals, every node comes back, and every page read
//! at VDL from every segment complete there must equal the model: all the
//! records at or below VDL applied in LSN order. Not simulated yet: front-end
//! crashes (the writer has no recovery) and reads with an AZ down.

use anyhow::{Result, bail};
use bytes::{Bytes, BytesMut};
use common::frame::decode_frame;
use common::ids::{AzId, Epoch, Lsn, NodeId, PageId, PgId, ReplicaIndex};
use common::message::{ErrorCode, Message, SealEpochRequest, StatusRequest};
use common::redo::PageOp;
use common::rng::SimRng;
use db_frontend::volume::geometry::{ClusterConfig, NodeSpec, VolumeGeometry};
use db_frontend::volume::writer::{PageChange, WriterCore};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::{Hash, Hasher};
use storage_node::disk::{LogDisk, MemoryDisk};
use storage_node::log_format::scan_log;
use storage_node::segment::{Action, LogWrite, SegmentConfig, SegmentCore};

const NODES: usize = 6;
const PGS: u32 = 2;
const PAGE_BYTES: usize = 512;
const PAGES_PER_PG: u64 = 8;
/// Mini-transactions the writer logs in one run.
const COMMITS: u64 = 300;
/// The writer's connection id on every node.
const WRITER: u64 = 1;
/// The recovering writer's connection id.
const SEALER: u64 = 2;
/// Every run ends by this virtual time (microseconds), or fails.
const DEADLINE_MICROS: u64 = 60_000_000;

/// Options of `lab sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimOptions {
    /// Run seeds 1..=N.
    #[arg(long, default_value_t = 1000)]
    pub seeds: u64,
    /// Run this one seed (replays a failure exactly), and print its event log.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Plant a known bug, to see the simulation catch it.
    #[arg(long, value_enum)]
    pub plant: Option<PlantedBug>,
}

/// Bugs the simulation must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlantedBug {
    /// The driver counts each acknowledgement twice (for the next replica too).
    AckCountedTwice,
}

/// What one seed did.
#[derive(Clone, Debug)]
pub struct SimReport {
    pub seed: u64,
    pub commits_acknowledged: u64,
    pub crashes: u64,
    pub messages_dropped: u64,
    pub sealed: bool,
    /// A hash of the event log: the same seed gives the same digest.
    pub digest: u64,
    pub events: Vec<String>,
}

#[derive(Debug)]
enum Event {
    /// A frame from the writer (or the sealer) reaches a node.
    ToNode {
        node: usize,
        from: u64,
        message: Message,
    },
    /// A node's answer reaches the writer (or the sealer).
    FromNode {
        node: usize,
        to: u64,
        message: Message,
    },
    /// A log write becomes durable, unless its node crashed since (`life`).
    DiskDone {
        node: usize,
        pg: usize,
        life: u64,
    },
    WriterStep,
    Tick,
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    Cut {
        node: usize,
    },
    Heal {
        node: usize,
    },
    Seal,
}

struct Segment {
    core: SegmentCore,
    /// The write in flight (the core has one at a time); durable when its event runs.
    in_flight: Option<LogWrite>,
}

struct Node {
    disks: Vec<MemoryDisk>,
    segments: Option<Vec<Segment>>,
    /// How many times the node started: a write of an earlier life is lost.
    life: u64,
    cut: bool,
    /// Highest SCL each segment ever reported (durable: it must never drop).
    scl_seen: Vec<Lsn>,
}

struct World {
    rng: SimRng,
    now: u64,
    sequence: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    geometry: VolumeGeometry,
    writer: WriterCore<u64>,
    nodes: Vec<Node>,
    /// Every allocated record, for the model: (lsn, page, offset, data).
    records: Vec<(Lsn, PageId, usize, Bytes)>,
    allocated: u64,
    acknowledged: u64,
    crashes: u64,
    dropped: u64,
    /// Per PG, the nodes that answered the seal and the SCL each reported.
    seal_answers: BTreeMap<PgId, Vec<(usize, Lsn)>>,
    sealed: bool,
    last_points: (Lsn, Lsn, Lsn),
    plant: Option<PlantedBug>,
    log: Vec<String>,
    hasher: std::collections::hash_map::DefaultHasher,
}

fn segment_config(pg: u32) -> SegmentConfig {
    SegmentConfig {
        log_file_bytes: 64 * 1024,
        log_files_target: 3,
        coalesce_chain_records: 4,
        coalesce_bytes_per_write: 4 * 1024,
        ..SegmentConfig::new(PgId(pg), PAGE_BYTES, PAGES_PER_PG)
    }
}

fn geometry() -> VolumeGeometry {
    let nodes = (0..NODES as u32)
        .map(|id| NodeSpec { id: NodeId(id), az: AzId((id / 2) as u8), address: format!("node-{id}") })
        .collect();
    VolumeGeometry::place(&ClusterConfig { nodes }, PGS, PAGES_PER_PG * PAGE_BYTES as u64, PAGE_BYTES)
        .expect("the simulated geometry is valid")
}

/// A frame the writer built, as the node decodes it.
fn decode(frame: &Bytes) -> Message {
    let mut buffer = BytesMut::from(&frame[..]);
    let frame = decode_frame(&mut buffer).expect("the writer's frames are valid").expect("whole frames");
    Message::decode(&frame).expect("the writer's messages are valid")
}

impl World {
    fn new(seed: u64, plant: Option<PlantedBug>) -> World {
        let geometry = geometry();
        let nodes = (0..NODES)
            .map(|_| {
                let disks: Vec<MemoryDisk> = (0..PGS).map(|_| MemoryDisk::new()).collect();
                let segments = (0..PGS)
                    .map(|pg| {
                        let (core, actions) = SegmentCore::create(segment_config(pg), Epoch::INITIAL).expect("config");
                        let mut disk_only = core;
                        disks[pg as usize].run_until_idle(&mut disk_only, actions, |_| {});
                        Segment { core: disk_only, in_flight: None }
                    })
                    .collect();
                Node { disks, segments: Some(segments), life: 0, cut: false, scl_seen: vec![Lsn::ZERO; PGS as usize] }
            })
            .collect();
        let mut writer = WriterCore::new(geometry.clone(), Epoch::INITIAL, 64);
        for pg in 0..PGS {
            for replica in 0..NODES as u8 {
                writer.segment_connected(PgId(pg), ReplicaIndex(replica), Lsn::ZERO, 0);
            }
        }
        let mut world = World {
            rng: SimRng::new(seed),
            now: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            geometry,
            writer,
            nodes,
            records: Vec::new(),
            allocated: 0,
            acknowledged: 0,
            crashes: 0,
            dropped: 0,
            seal_answers: BTreeMap::new(),
            sealed: false,
            last_points: (Lsn::ZERO, Lsn::ZERO, Lsn::ZERO),
            plant,
            log: Vec::new(),
            hasher: std::collections::hash_map::DefaultHasher::new(),
        };
        world.schedule(0, Event::WriterStep);
        world.schedule(1_000, Event::Tick);
        // Faults: crashes and partitions, at most two nodes out at once.
        for _ in 0..world.rng.below(5) {
            let at = 5_000 + world.rng.below(400_000);
            let node = world.rng.below(NODES as u64) as usize;
            let event = if world.rng.below(2) == 0 { Event::Crash { node } } else { Event::Cut { node } };
            world.schedule(at, event);
        }
        if world.rng.below(3) == 0 {
            let at = 50_000 + world.rng.below(400_000);
            world.schedule(at, Event::Seal);
        }
        world
    }

    fn schedule(&mut self, after: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse((self.now + after, self.sequence)));
        self.events.insert(self.sequence, event);
    }

    fn note(&mut self, line: String) {
        line.hash(&mut self.hasher);
        self.log.push(line);
    }

    fn out(&self) -> usize {
        self.nodes.iter().filter(|node| node.segments.is_none() || node.cut).count()
    }

    /// A message on the network: dropped, delayed, or also duplicated.
    fn send(&mut self, event: impl Fn() -> Event, faults: bool) {
        if faults && self.rng.below(100) < 5 {
            self.dropped += 1;
            return;
        }
        let copies = if faults && self.rng.below(100) < 3 { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 20 + self.rng.below(2_000);
            self.schedule(delay, event());
        }
    }

    fn send_frames(&mut self, faults: bool) {
        for outgoing in self.writer.flush(self.now) {
            let node = outgoing.node.0 as usize;
            let message = decode(&outgoing.frame);
            self.send(|| Event::ToNode { node, from: WRITER, message: message.clone() }, faults);
        }
    }

    fn carry_out(&mut self, node: usize, pg: usize, actions: Vec<Action>, faults: bool) -> Result<()> {
        for action in actions {
            match action {
                Action::Write(write) => {
                    let segments = self.nodes[node].segments.as_mut().expect("running");
                    segments[pg].in_flight = Some(write);
                    let (delay, life) = (50 + self.rng.below(500), self.nodes[node].life);
                    self.schedule(delay, Event::DiskDone { node, pg, life });
                }
                Action::Ack { to, ack } => {
                    self.send(|| Event::FromNode { node, to, message: Message::AppendAck(ack) }, faults)
                }
                Action::Refuse { to, error } => {
                    self.send(|| Event::FromNode { node, to, message: Message::Error(error.clone()) }, faults)
                }
                Action::Status { to, status } => {
                    self.send(|| Event::FromNode { node, to, message: Message::Status(status) }, faults)
                }
                Action::DeleteFile(file) => self.nodes[node].disks[pg].delete_file(file)?,
            }
        }
        Ok(())
    }

    fn replica_of(&self, pg: PgId, node: usize) -> ReplicaIndex {
        self.geometry.segments_on(NodeId(node as u32)).into_iter().find(|(at, _)| *at == pg).expect("hosted").1
    }

    fn step(&mut self, event: Event, faults: bool) -> Result<()> {
        match event {
            Event::WriterStep => {
                if self.allocated < COMMITS && !self.writer.is_fenced() {
                    let pages = 1 + self.rng.below(3);
                    let changes: Vec<PageChange> = (0..pages)
                        .map(|_| {
                            let page = PageId(self.rng.below(u64::from(PGS) * PAGES_PER_PG));
                            let offset = (self.rng.below(PAGE_BYTES as u64 / 8) * 8) as u32;
                            let data = Bytes::from(self.rng.below(u64::MAX).to_le_bytes().to_vec());
                            PageChange { page, op: PageOp::Write { offset, data } }
                        })
                        .collect();
                    if let Ok(last) = self.writer.allocate(&changes) {
                        let first = last.0 + 1 - changes.len() as u64;
                        for (index, change) in changes.iter().enumerate() {
                            if let PageOp::Write { offset, data } = &change.op {
                                let lsn = Lsn(first + index as u64);
                                self.records.push((lsn, change.page, *offset as usize, data.clone()));
                            }
                        }
                        self.allocated += 1;
                        let _already_durable = self.writer.wait_durable(last, last.0);
                        self.send_frames(faults);
                    }
                    let pause = self.rng.below(300);
                    self.schedule(pause, Event::WriterStep);
                }
            }
            Event::Tick => {
                if self.writer.tick(self.now) {
                    self.send_frames(faults);
                }
                for node in 0..NODES {
                    if self.nodes[node].segments.is_some() {
                        self.ask_status(node, faults);
                    }
                }
                self.schedule(5_000, Event::Tick);
            }
            Event::ToNode { node, from, message } => {
                if self.nodes[node].cut {
                    return Ok(());
                }
                let Some(segments) = self.nodes[node].segments.as_mut() else { return Ok(()) };
                match message {
                    Message::Append(request) => {
                        let pg = request.pg.0 as usize;
                        let segment_epoch = segments[pg].core.status(0).epoch;
                        let stale = request.epoch < segment_epoch;
                        let actions = segments[pg].core.append(request, from);
                        if stale && !actions.iter().all(|action| matches!(action, Action::Refuse { .. })) {
                            bail!("node {node} took an append of an epoch older than its {segment_epoch}");
                        }
                        self.carry_out(node, pg, actions, faults)?;
                    }
                    Message::StatusRequest(request) => {
                        let status = segments[request.pg.0 as usize].core.status(request.request_id);
                        self.send(|| Event::FromNode { node, to: from, message: Message::Status(status) }, faults);
                    }
                    Message::SealEpoch(request) => {
                        let pg = request.pg.0 as usize;
                        let actions = segments[pg].core.seal(request.request_id, request.epoch, from);
                        self.carry_out(node, pg, actions, faults)?;
                    }
                    other => bail!("unexpected message to a node: {other:?}"),
                }
            }
            Event::FromNode { node, to, message } => {
                if self.nodes[node].cut {
                    return Ok(());
                }
                if to == SEALER {
                    if let Message::Status(status) = message
                        && status.epoch == Epoch(2)
                    {
                        let answered = self.seal_answers.entry(status.pg).or_default();
                        if !answered.iter().any(|(answering, _)| *answering == node) {
                            answered.push((node, status.segment_complete_lsn));
                        }
                        let holds =
                            (0..PGS).all(|pg| self.seal_answers.get(&PgId(pg)).is_some_and(|nodes| nodes.len() >= 4));
                        if holds && !self.sealed {
                            self.sealed = true;
                            self.note(format!("{} seal holds on a write quorum of every PG", self.now));
                        }
                    }
                    return Ok(());
                }
                self.writer_receives(node, message, faults)?;
            }
            Event::DiskDone { node, pg, life } => {
                if life != self.nodes[node].life {
                    return Ok(()); // the node crashed with the write in flight: lost
                }
                let Some(segments) = self.nodes[node].segments.as_mut() else { return Ok(()) };
                let write = segments[pg].in_flight.take().expect("a write in flight");
                let id = write.id;
                self.nodes[node].disks[pg].write_durable(write, Box::new(|_| {})).expect("at once")?;
                let segments = self.nodes[node].segments.as_mut().expect("running");
                let actions = segments[pg].core.write_done(id);
                self.carry_out(node, pg, actions, faults)?;
                let background = self.nodes[node].segments.as_mut().expect("running")[pg].core.background();
                self.carry_out(node, pg, background, faults)?;
                self.check_segment(node, pg)?;
            }
            Event::Crash { node } => {
                if self.nodes[node].segments.is_some() && self.out() < 2 {
                    self.nodes[node].segments = None; // writes in flight are lost
                    self.crashes += 1;
                    for (pg, replica) in self.geometry.segments_on(NodeId(node as u32)) {
                        self.writer.segment_disconnected(pg, replica);
                    }
                    let after = 1_000 + self.rng.below(200_000);
                    self.schedule(after, Event::Restart { node });
                }
            }
            Event::Restart { node } => self.restart(node, faults)?,
            Event::Cut { node } => {
                if !self.nodes[node].cut && self.nodes[node].segments.is_some() && self.out() < 2 {
                    self.nodes[node].cut = true;
                    let after = 1_000 + self.rng.below(200_000);
                    self.schedule(after, Event::Heal { node });
                }
            }
            Event::Heal { node } => {
                self.nodes[node].cut = false;
            }
            Event::Seal => {
                for node in 0..NODES {
                    for (pg, _) in self.geometry.segments_on(NodeId(node as u32)) {
                        let request = SealEpochRequest { request_id: u64::from(pg.0) + 1, pg, epoch: Epoch(2) };
                        self.send(
                            || Event::ToNode { node, from: SEALER, message: Message::SealEpoch(request) },
                            faults,
                        );
                    }
                }
                if !self.sealed {
                    self.schedule(20_000, Event::Seal); // again until a quorum answered
                }
            }
        }
        Ok(())
    }

    fn restart(&mut self, node: usize, faults: bool) -> Result<()> {
        if self.nodes[node].segments.is_some() {
            return Ok(());
        }
        let mut segments = Vec::new();
        for pg in 0..PGS as usize {
            let disk = &self.nodes[node].disks[pg];
            let scan = scan_log(&disk.read_all()?);
            let end = scan.end;
            let (core, report) = SegmentCore::recover(segment_config(pg as u32), scan).map_err(anyhow::Error::msg)?;
            if report.truncated_tail_bytes > 0 {
                disk.zero(end, report.truncated_tail_bytes)?;
            }
            segments.push(Segment { core, in_flight: None });
        }
        self.nodes[node].segments = Some(segments);
        self.nodes[node].life += 1;
        for pg in 0..PGS as usize {
            self.check_segment(node, pg)?;
        }
        self.ask_status(node, faults);
        Ok(())
    }

    /// The writer asks a node for the status of each hosted segment it does
    /// not count as connected (as the real client does on every connect,
    /// and again until each answered): the answer restarts the sending.
    fn ask_status(&mut self, node: usize, faults: bool) {
        for (pg, replica) in self.geometry.segments_on(NodeId(node as u32)) {
            if !self.writer.is_connected(pg, replica) {
                let request = StatusRequest { request_id: 0, pg };
                self.send(|| Event::ToNode { node, from: WRITER, message: Message::StatusRequest(request) }, faults);
            }
        }
    }

    fn writer_receives(&mut self, node: usize, message: Message, faults: bool) -> Result<()> {
        let now = self.now;
        let durable = match message {
            Message::AppendAck(ack) => {
                if self.writer.observe_epoch(Some(ack.epoch)).is_some() || self.writer.is_fenced() {
                    return Ok(());
                }
                let replica = self.replica_of(ack.pg, node);
                let mut durable = self.writer.acknowledged(ack.pg, replica, ack.segment_complete_lsn, now);
                if self.plant == Some(PlantedBug::AckCountedTwice) {
                    let other = ReplicaIndex((replica.0 + 1) % NODES as u8);
                    durable.waiters.extend(self.writer.acknowledged(ack.pg, other, ack.segment_complete_lsn, now));
                }
                durable.waiters
            }
            Message::Status(status) => {
                if self.writer.observe_epoch(Some(status.epoch)).is_some() || self.writer.is_fenced() {
                    return Ok(());
                }
                let replica = self.replica_of(status.pg, node);
                self.writer.segment_connected(status.pg, replica, status.segment_complete_lsn, now).waiters
            }
            Message::Error(error) if error.code == ErrorCode::StaleEpoch => {
                self.writer.observe_epoch(None);
                Vec::new()
            }
            Message::Error(error) => {
                let replica = self.replica_of(error.pg, node);
                self.writer.resend_from_complete(error.pg, replica);
                Vec::new()
            }
            other => bail!("unexpected message to the writer: {other:?}"),
        };
        self.acknowledged += durable.len() as u64;
        self.check_writer()?;
        self.send_frames(faults);
        Ok(())
    }

    /// A segment's SCL never drops, not even across a restart.
    fn check_segment(&mut self, node: usize, pg: usize) -> Result<()> {
        let Some(segments) = self.nodes[node].segments.as_ref() else { return Ok(()) };
        let scl = segments[pg].core.segment_complete_lsn();
        let seen = &mut self.nodes[node].scl_seen[pg];
        if scl < *seen {
            bail!("node {node} PG {pg}: SCL went back from {seen} to {scl}");
        }
        *seen = scl;
        Ok(())
    }

    /// PGCL is backed by four real SCLs; HA, VCL and VDL only move forward.
    fn check_writer(&mut self) -> Result<()> {
        for pg in 0..PGS {
            let claimed = self.writer.pg_complete_lsn(PgId(pg));
            let mut scls: Vec<Lsn> = self.nodes.iter().map(|node| node.scl_seen[pg as usize]).collect();
            scls.sort_unstable_by(|a, b| b.cmp(a));
            if claimed > scls[3] {
                bail!(
                    "PG {pg}: the writer's PGCL {claimed} is above the fourth-highest real SCL {} ({scls:?})",
                    scls[3]
                );
            }
        }
        if self.sealed {
            for (pg, answers) in &self.seal_answers {
                let mut scls: Vec<Lsn> = answers.iter().map(|(_, scl)| *scl).collect();
                scls.sort_unstable_by(|a, b| b.cmp(a));
                let claimed = self.writer.pg_complete_lsn(*pg);
                if scls.len() >= 2 && claimed > scls[1] {
                    bail!("{pg}: the old writer's PGCL {claimed} is above what the seal can see ({scls:?})");
                }
            }
        }
        let points = self.writer.points();
        let now = (points.highest_allocated, points.volume_complete, points.volume_durable);
        if now.0 < self.last_points.0 || now.1 < self.last_points.1 || now.2 < self.last_points.2 {
            bail!("the writer's points went back: {:?} -> {now:?}", self.last_points);
        }
        self.last_points = now;
        Ok(())
    }

    /// Every page read at VDL from every segment complete there equals the model.
    fn check_pages(&mut self) -> Result<()> {
        let durable = self.writer.points().volume_durable;
        let mut model: BTreeMap<PageId, Vec<u8>> = BTreeMap::new();
        let mut records: Vec<&(Lsn, PageId, usize, Bytes)> =
            self.records.iter().filter(|(lsn, ..)| *lsn <= durable).collect();
        records.sort_by_key(|(lsn, ..)| *lsn);
        for (_, page, offset, data) in records {
            let image = model.entry(*page).or_insert_with(|| vec![0u8; PAGE_BYTES]);
            image[*offset..*offset + data.len()].copy_from_slice(data);
        }
        let mut read = 0;
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(segments) = node.segments.as_ref() else { continue };
            for pg in 0..PGS {
                let point = self.writer.pg_read_point(PgId(pg), durable);
                let segment = &segments[pg as usize];
                if segment.core.segment_complete_lsn() < point {
                    continue;
                }
                for page in (u64::from(pg) * PAGES_PER_PG)..(u64::from(pg) + 1) * PAGES_PER_PG {
                    let page = PageId(page);
                    let (_, image) = segment
                        .core
                        .read_page(page, point, segment.core.status(0).epoch)
                        .map_err(|refusal| anyhow::anyhow!("node {index} {page} at {point}: {refusal:?}"))?;
                    let expected = model.get(&page).cloned().unwrap_or_else(|| vec![0u8; PAGE_BYTES]);
                    if image[..] != expected[..] {
                        bail!("node {index} {page} at {point}: the page differs from the model");
                    }
                    read += 1;
                }
            }
        }
        if read == 0 {
            bail!("no segment was complete at VDL {durable}");
        }
        Ok(())
    }
}

/// One line of the event log (message kinds and the numbers that matter).
fn describe(event: &Event) -> String {
    let message = |message: &Message| match message {
        Message::Append(append) => {
            let lsns: Vec<u64> = append.records.iter().map(|record| record.lsn.0).collect();
            format!("append {} {} {lsns:?}", append.pg, append.epoch)
        }
        Message::AppendAck(ack) => format!("ack {} {} scl {}", ack.pg, ack.epoch, ack.segment_complete_lsn),
        Message::Status(status) => format!("status {} {} scl {}", status.pg, status.epoch, status.segment_complete_lsn),
        Message::Error(error) => format!("error {} {:?}", error.pg, error.code),
        Message::StatusRequest(request) => format!("status? {}", request.pg),
        Message::SealEpoch(request) => format!("seal {} {}", request.pg, request.epoch),
        other => format!("{other:?}"),
    };
    match event {
        Event::ToNode { node, from, message: m } => format!("{from} -> node {node}: {}", message(m)),
        Event::FromNode { node, to, message: m } => format!("node {node} -> {to}: {}", message(m)),
        other => format!("{other:?}"),
    }
}

/// Runs one seed; `Err` names the invariant that broke.
pub fn run_seed(seed: u64, plant: Option<PlantedBug>) -> Result<SimReport> {
    let mut world = World::new(seed, plant);
    let mut healing = false;
    while let Some(Reverse((at, sequence))) = world.queue.pop() {
        let event = world.events.remove(&sequence).expect("scheduled");
        world.now = at;
        if world.now > DEADLINE_MICROS {
            bail!("seed {seed}: still running at {DEADLINE_MICROS} µs virtual time");
        }
        let done = world.allocated >= COMMITS || world.writer.is_fenced();
        if done && !healing {
            // The end: no more faults; every node comes back.
            healing = true;
            world.note(format!("{at} heal"));
            for node in 0..NODES {
                world.nodes[node].cut = false;
                world.restart(node, false)?;
            }
        }
        if healing && matches!(event, Event::Crash { .. } | Event::Cut { .. } | Event::Seal) {
            continue;
        }
        world.note(format!("{at} {}", describe(&event)));
        world.step(event, !healing)?;
        let points = world.writer.points();
        let settled = healing
            && (world.writer.is_fenced() || points.volume_durable == points.highest_allocated)
            && world.nodes.iter().all(|node| {
                node.segments
                    .as_ref()
                    .is_some_and(|segments| segments.iter().all(|segment| segment.in_flight.is_none()))
            });
        if settled {
            break;
        }
    }
    world.check_pages()?;
    let digest = world.hasher.finish();
    Ok(SimReport {
        seed,
        commits_acknowledged: world.acknowledged,
        crashes: world.crashes,
        messages_dropped: world.dropped,
        sealed: world.sealed,
        digest,
        events: world.log,
    })
}

/// `lab sim`: runs the seeds, stops at the first failure and prints how to replay it.
pub fn run(options: &SimOptions) -> Result<()> {
    if let Some(seed) = options.seed {
        let report = run_seed(seed, options.plant).map_err(|error| anyhow::anyhow!("seed {seed} failed: {error}"))?;
        for line in &report.events {
            println!("{line}");
        }
        println!("{}", summary(&report));
        return Ok(());
    }
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    for seed in 1..=options.seeds {
        match run_seed(seed, options.plant) {
            Ok(report) => {
                totals.0 += report.commits_acknowledged;
                totals.1 += report.crashes;
                totals.2 += report.messages_dropped;
                totals.3 += u64::from(report.sealed);
            }
            Err(error) => {
                let plant = options
                    .plant
                    .and_then(|bug| clap::ValueEnum::to_possible_value(&bug))
                    .map(|value| format!(" --plant {}", value.get_name()))
                    .unwrap_or_default();
                bail!("seed {seed} failed: {error}\nreplay: lab sim --seed {seed}{plant}");
            }
        }
    }
    println!(
        "{} seeds passed: {} commits acknowledged, {} node crashes, {} messages dropped, {} runs sealed",
        options.seeds, totals.0, totals.1, totals.2, totals.3
    );
    Ok(())
}

fn summary(report: &SimReport) -> String {
    format!(
        "seed {}: {} commits acknowledged, {} crashes, {} messages dropped, sealed {}, digest {:016x}",
        report.seed, report.commits_acknowledged, report.crashes, report.messages_dropped, report.sealed, report.digest
    )
}

/// The seeds of `seeds` that failed, with the invariant each broke.
pub fn failing_seeds(seeds: std::ops::RangeInclusive<u64>, plant: Option<PlantedBug>) -> Vec<(u64, String)> {
    seeds.filter_map(|seed| run_seed(seed, plant).err().map(|error| (seed, error.to_string()))).collect()
}
