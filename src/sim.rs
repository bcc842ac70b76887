//! `lab sim`: a seeded, deterministic simulation of the redo protocol. It
//! drives the real cores, with no threads, sockets or clocks: the
//! front end's [`RecoveryCore`] and [`WriterCore`], and the
//! [`SegmentCore`]s of six storage nodes (two PGs).
//!
//! - **Network:** every message is delayed by a random amount (so messages
//!   reorder), and may be dropped or duplicated; a node may be cut off for
//!   a while (a partition).
//! - **Disk:** each segment's log write becomes durable only when its
//!   completion event runs. A node that crashes loses the writes still in
//!   flight, then restarts from its memory disk (`scan_log`,
//!   `SegmentCore::recover`). At most two nodes are down or cut off at
//!   once, except for an AZ+1 outage (a whole AZ and one more node), during
//!   which writes stop and reads go on from what is left.
//! - **Front end:** every front end starts by recovering the volume
//!   (probe, seal, fetch, decide), then writes and reads. It may crash
//!   (its messages in flight still arrive) or go on as a zombie while a
//!   new one recovers; the zombie must be fenced. A recovery that cannot
//!   finish is abandoned and a new one starts, as an operator would.
//!
//! Checked on every step:
//! - a writer's PGCL of each PG is backed by four real SCLs (the fourth
//!   highest SCL its segments ever reported);
//! - a writer's HA, VCL and VDL only move forward; so does every
//!   segment's SCL while its epoch and truncation list stay the same;
//! - a segment never takes an append, a read, a seal or an open of an
//!   epoch older than its own;
//! - when a recovery decides, its VDL covers every commit any writer
//!   acknowledged so far, each of them lies on its volume chain, and each
//!   recovered record is byte for byte the record its writer allocated;
//! - every page a reader is served at read point `R` (and every page LSN
//!   a writer learns) equals the model: the records on the volume chain
//!   ending at `R`, applied in LSN order. Nothing above VDL, nor any record
//!   a recovery truncated, is ever visible.
//!
//! At the end the faults stop, every node comes back, the last writer
//! makes everything durable, and every page read at VDL from every segment
//! complete there must equal the model; every acknowledged commit must lie
//! on the final volume chain.

use anyhow::{Result, bail};
use bytes::{Bytes, BytesMut};
use common::frame::decode_frame;
use common::ids::{AzId, Epoch, Lsn, NodeId, PageId, PgId, ReplicaIndex};
use common::message::{ErrorCode, Message, ReadPageRequest, StatusRequest};
use common::redo::PageOp;
use common::rng::SimRng;
use db_frontend::volume::geometry::{ClusterConfig, NodeSpec, VolumeGeometry};
use db_frontend::volume::recovery::{RecoveredLog, RecoveryCore};
use db_frontend::volume::writer::{AllocationError, PageChange, StatusOutcome, WriterCore};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};
use storage_node::disk::{LogDisk, MemoryDisk};
use storage_node::log_format::scan_log;
use storage_node::segment::{Action, LogWrite, SegmentConfig, SegmentCore};

const NODES: usize = 6;
const PGS: u32 = 2;
const PAGE_BYTES: usize = 512;
const PAGES_PER_PG: u64 = 8;
/// Mini-transactions the front ends log in one run.
const COMMITS: u64 = 300;
/// The LSN allocation limit of every writer.
const ALLOCATION_LIMIT: u64 = 64;
/// Front end `k` is connection `FRONTEND_BASE + k` on every node.
const FRONTEND_BASE: u64 = 10;
/// Node `i` asking a peer (gossip, repair) is connection `PEER_BASE + i`.
const PEER_BASE: u64 = 1_000_000;
/// How often each node's segments may gossip (as `BACKGROUND_INTERVAL`).
const GOSSIP_INTERVAL_MICROS: u64 = 20_000;
/// A read unanswered this long is given up.
const READ_TIMEOUT_MICROS: u64 = 20_000;
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
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub commits_acknowledged: u64,
    pub crashes: u64,
    pub messages_dropped: u64,
    /// Front ends that finished a recovery (the first one included).
    pub recoveries: u64,
    /// Front ends that crashed, or went on as zombies, mid-run.
    pub frontend_failures: u64,
    /// Pages served to readers and checked against the model.
    pub reads_checked: u64,
    /// Of those, served while an AZ and one more node were down.
    pub reads_during_az_outage: u64,
    /// Records segments took from their peers to fill holes (gossip).
    pub gossip_records: u64,
    /// Page-state batches segments took from peers (repair by hydration).
    pub hydrate_batches: u64,
    /// A hash of the event log: the same seed gives the same digest.
    pub digest: u64,
    pub events: Vec<String>,
}

#[derive(Debug)]
enum Event {
    /// A frame from a front end reaches a node.
    ToNode {
        node: usize,
        from: u64,
        message: Message,
    },
    /// A node's answer reaches a front end.
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
    /// Front end `frontend` logs its next mini-transaction.
    WriterStep {
        frontend: usize,
    },
    /// Front end `frontend` reads a page.
    ReadStep {
        frontend: usize,
    },
    /// Node `node`'s segments gossip with their peers and run background work.
    GossipRound {
        node: usize,
    },
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
    /// An AZ and one more node go down at once.
    AzOutage {
        az: usize,
        extra: usize,
    },
    /// The current front end crashes, or (`zombie`) goes on while a new one takes over.
    FrontendFails {
        zombie: bool,
    },
    FrontendStarts,
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
    /// Highest SCL each segment ever reported (what a writer's PGCL may rest on).
    scl_seen: Vec<Lsn>,
    /// Each segment's (epoch, open epoch, SCL) when last looked at.
    scl_in_epoch: Vec<(Epoch, Epoch, Lsn)>,
}

/// A record a writer allocated, for the model.
#[derive(Clone, Debug)]
struct Allocated {
    page: PageId,
    offset: usize,
    data: Bytes,
    prev_volume: Lsn,
    /// The epoch of the writer that allocated it.
    epoch: Epoch,
}

/// Why a read was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadPurpose {
    Verify,
    /// The writer needs the page's last LSN before it may write it.
    LearnLsn,
}

struct PendingRead {
    request_id: u64,
    point: Lsn,
    page: PageId,
    targets: Vec<NodeId>,
    purpose: ReadPurpose,
    sent_at: u64,
}

enum FrontendState {
    Recovering(Box<RecoveryCore>),
    Writing(Box<WriterCore<u64>>),
    Dead,
}

struct Frontend {
    state: FrontendState,
    read: Option<PendingRead>,
    next_request: u64,
    /// The writer's (HA, VCL, VDL) when last checked.
    last_points: (Lsn, Lsn, Lsn),
    /// Per PG, the LSNs of the records on this writer's volume chain (the
    /// recovered one, then its own).
    pg_lsns: Vec<BTreeSet<Lsn>>,
    /// The same records per page, ascending: what a read at a point sees.
    page_lsns: BTreeMap<PageId, Vec<Lsn>>,
}

impl Frontend {
    fn writer(&mut self) -> Option<&mut WriterCore<u64>> {
        match &mut self.state {
            FrontendState::Writing(writer) => Some(writer),
            _ => None,
        }
    }
}

struct World {
    rng: SimRng,
    now: u64,
    sequence: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    geometry: VolumeGeometry,
    frontends: Vec<Frontend>,
    nodes: Vec<Node>,
    /// Every record any writer allocated, by LSN (LSNs are never reused:
    /// each epoch allocates above its truncation range).
    records: BTreeMap<Lsn, Allocated>,
    allocated: u64,
    /// Every commit (its CPL) any writer acknowledged.
    /// ... and the epoch of the writer that acknowledged it.
    acknowledged: BTreeMap<Lsn, Epoch>,
    crashes: u64,
    dropped: u64,
    recoveries: u64,
    frontend_failures: u64,
    reads_checked: u64,
    reads_during_az_outage: u64,
    gossip_records: u64,
    hydrate_batches: u64,
    az_outage: bool,
    healing: bool,
    plant: Option<PlantedBug>,
    /// Keep the whole event log (a replay), not only its digest.
    verbose: bool,
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

/// A frame a core built, as its receiver decodes it.
fn decode(frame: &Bytes) -> Message {
    let mut buffer = BytesMut::from(&frame[..]);
    let frame = decode_frame(&mut buffer).expect("the cores' frames are valid").expect("whole frames");
    Message::decode(&frame).expect("the cores' messages are valid")
}

fn frontend_id(frontend: usize) -> u64 {
    FRONTEND_BASE + frontend as u64
}

impl World {
    fn new(seed: u64, plant: Option<PlantedBug>) -> World {
        let geometry = geometry();
        let nodes = (0..NODES)
            .map(|_| {
                let disks: Vec<MemoryDisk> = (0..PGS).map(|_| MemoryDisk::new()).collect();
                let segments = (0..PGS)
                    .map(|pg| {
                        let (mut core, actions) =
                            SegmentCore::create(segment_config(pg), Epoch::INITIAL).expect("config");
                        disks[pg as usize].run_until_idle(&mut core, actions, |_| {});
                        Segment { core, in_flight: None }
                    })
                    .collect();
                Node {
                    disks,
                    segments: Some(segments),
                    life: 0,
                    cut: false,
                    scl_seen: vec![Lsn::ZERO; PGS as usize],
                    scl_in_epoch: vec![(Epoch::INITIAL, Epoch::NONE, Lsn::ZERO); PGS as usize],
                }
            })
            .collect();
        let mut world = World {
            rng: SimRng::new(seed),
            now: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            geometry,
            frontends: Vec::new(),
            nodes,
            records: BTreeMap::new(),
            allocated: 0,
            acknowledged: BTreeMap::new(),
            crashes: 0,
            dropped: 0,
            recoveries: 0,
            frontend_failures: 0,
            reads_checked: 0,
            reads_during_az_outage: 0,
            gossip_records: 0,
            hydrate_batches: 0,
            az_outage: false,
            healing: false,
            plant,
            verbose: false,
            log: Vec::new(),
            hasher: std::collections::hash_map::DefaultHasher::new(),
        };
        world.schedule(0, Event::FrontendStarts);
        world.schedule(1_000, Event::Tick);
        for node in 0..NODES {
            let at = 1_000 + world.rng.below(GOSSIP_INTERVAL_MICROS);
            world.schedule(at, Event::GossipRound { node });
        }
        // Node faults: crashes and partitions, at most two nodes out at once.
        for _ in 0..world.rng.below(5) {
            let at = 5_000 + world.rng.below(400_000);
            let node = world.rng.below(NODES as u64) as usize;
            let event = if world.rng.below(2) == 0 { Event::Crash { node } } else { Event::Cut { node } };
            world.schedule(at, event);
        }
        if world.rng.below(4) == 0 {
            let at = 20_000 + world.rng.below(300_000);
            let az = world.rng.below(3) as usize;
            let extra = (2 * ((az + 1 + world.rng.below(2) as usize) % 3)) + world.rng.below(2) as usize;
            world.schedule(at, Event::AzOutage { az, extra });
        }
        // Front-end failures in half of the runs.
        if world.rng.below(2) == 0 {
            for _ in 0..1 + world.rng.below(3) {
                let at = 10_000 + world.rng.below(400_000);
                let zombie = world.rng.below(3) == 0;
                world.schedule(at, Event::FrontendFails { zombie });
            }
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

    /// Notes an event: in full when the log is kept, else only a cheap
    /// fingerprint in the digest (formatting every message costs most of
    /// a run's time).
    fn note_event(&mut self, at: u64, event: &Event) {
        if self.verbose {
            self.note(format!("{at} {}", describe(event)));
            return;
        }
        at.hash(&mut self.hasher);
        std::mem::discriminant(event).hash(&mut self.hasher);
        match event {
            Event::ToNode { node, message, .. } | Event::FromNode { node, message, .. } => {
                node.hash(&mut self.hasher);
                std::mem::discriminant(message).hash(&mut self.hasher);
            }
            Event::DiskDone { node, pg, .. } => (node, pg).hash(&mut self.hasher),
            _ => {}
        }
    }

    fn out(&self) -> usize {
        self.nodes.iter().filter(|node| node.segments.is_none() || node.cut).count()
    }

    /// The front end in charge: the unfenced writer with the highest epoch
    /// (two recoveries may race; the lower one is fenced), else the newest.
    fn current(&self) -> usize {
        self.frontends
            .iter()
            .enumerate()
            .filter_map(|(index, frontend)| match &frontend.state {
                FrontendState::Writing(writer) if !writer.is_fenced() => Some((writer.epoch(), index)),
                _ => None,
            })
            .max()
            .map_or(self.frontends.len() - 1, |(_, index)| index)
    }

    /// A message on the network: dropped, delayed, or also duplicated.
    fn send(&mut self, event: impl Fn() -> Event) {
        let faults = !self.healing;
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

    fn send_to_node(&mut self, frontend: usize, node: NodeId, message: Message) {
        let (node, from) = (node.0 as usize, frontend_id(frontend));
        self.send(|| Event::ToNode { node, from, message: message.clone() });
    }

    fn send_frames(&mut self, frontend: usize) {
        let now = self.now;
        let Some(writer) = self.frontends[frontend].writer() else { return };
        for outgoing in writer.flush(now) {
            let message = decode(&outgoing.frame);
            self.send_to_node(frontend, outgoing.node, message);
        }
    }

    fn carry_out(&mut self, node: usize, pg: usize, actions: Vec<Action>) -> Result<()> {
        for action in actions {
            match action {
                Action::Write(write) => {
                    let segments = self.nodes[node].segments.as_mut().expect("running");
                    segments[pg].in_flight = Some(write);
                    let (delay, life) = (50 + self.rng.below(500), self.nodes[node].life);
                    self.schedule(delay, Event::DiskDone { node, pg, life });
                }
                Action::Ack { to, ack } => self.send(|| Event::FromNode { node, to, message: Message::AppendAck(ack) }),
                Action::Refuse { to, error } => {
                    self.send(|| Event::FromNode { node, to, message: Message::Error(error.clone()) })
                }
                Action::Status { to, status } => {
                    self.send(|| Event::FromNode { node, to, message: Message::Status(status) })
                }
                Action::DeleteFile(file) => self.nodes[node].disks[pg].delete_file(file)?,
            }
        }
        self.check_segment(node, pg)
    }

    fn replica_of(&self, pg: PgId, node: usize) -> ReplicaIndex {
        self.geometry.segments_on(NodeId(node as u32)).into_iter().find(|(at, _)| *at == pg).expect("hosted").1
    }

    fn step(&mut self, event: Event) -> Result<()> {
        match event {
            Event::WriterStep { frontend } => self.writer_step(frontend)?,
            Event::ReadStep { frontend } => {
                if matches!(self.frontends[frontend].state, FrontendState::Dead) {
                    return Ok(());
                }
                if self.frontends[frontend].read.is_none() {
                    let page = PageId(self.rng.below(u64::from(PGS) * PAGES_PER_PG));
                    self.begin_read(frontend, page, ReadPurpose::Verify);
                }
                let pause = 500 + self.rng.below(3_000);
                self.schedule(pause, Event::ReadStep { frontend });
            }
            Event::Tick => {
                for frontend in 0..self.frontends.len() {
                    self.tick_frontend(frontend)?;
                }
                self.schedule(5_000, Event::Tick);
            }
            Event::ToNode { node, from, message } => self.node_receives(node, from, message)?,
            Event::FromNode { node, to, message } => {
                if self.nodes[node].cut {
                    return Ok(());
                }
                if to >= PEER_BASE {
                    self.peer_answer_arrives((to - PEER_BASE) as usize, message)?;
                } else {
                    let frontend = (to - FRONTEND_BASE) as usize;
                    self.frontend_receives(frontend, node, message)?;
                }
            }
            Event::GossipRound { node } => {
                self.schedule(GOSSIP_INTERVAL_MICROS, Event::GossipRound { node });
                self.gossip_round(node)?;
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
                self.carry_out(node, pg, actions)?;
                let background = self.nodes[node].segments.as_mut().expect("running")[pg].core.background();
                self.carry_out(node, pg, background)?;
            }
            Event::Crash { node } => {
                if self.nodes[node].segments.is_some() && self.out() < 2 && !self.az_outage {
                    self.crash(node);
                    let after = 1_000 + self.rng.below(200_000);
                    self.schedule(after, Event::Restart { node });
                }
            }
            Event::Restart { node } => {
                self.restart(node)?;
                if self.az_outage && self.nodes.iter().all(|node| node.segments.is_some()) {
                    self.az_outage = false;
                }
            }
            Event::Cut { node } => {
                if !self.nodes[node].cut && self.nodes[node].segments.is_some() && self.out() < 2 && !self.az_outage {
                    self.nodes[node].cut = true;
                    let after = 1_000 + self.rng.below(200_000);
                    self.schedule(after, Event::Heal { node });
                }
            }
            Event::Heal { node } => self.nodes[node].cut = false,
            Event::AzOutage { az, extra } => {
                if self.out() == 0 {
                    self.az_outage = true;
                    for node in [2 * az, 2 * az + 1, extra] {
                        self.crash(node);
                        let after = 20_000 + self.rng.below(150_000);
                        self.schedule(after, Event::Restart { node });
                    }
                }
            }
            Event::FrontendFails { zombie } => {
                let current = self.current();
                if matches!(self.frontends[current].state, FrontendState::Writing(_)) {
                    self.frontend_failures += 1;
                    if !zombie {
                        self.frontends[current].state = FrontendState::Dead;
                    }
                    let after = 1_000 + self.rng.below(20_000);
                    self.schedule(after, Event::FrontendStarts);
                }
            }
            Event::FrontendStarts => self.start_frontend(),
        }
        Ok(())
    }

    /// Each segment of `node` may ask one of its PG's peers for what it lacks.
    fn gossip_round(&mut self, node: usize) -> Result<()> {
        if self.nodes[node].cut || self.nodes[node].segments.is_none() {
            return Ok(());
        }
        let peers = self.geometry.peers_of(NodeId(node as u32));
        for pg in 0..PGS as usize {
            let addresses = &peers[&PgId(pg as u32)];
            let segments = self.nodes[node].segments.as_mut().expect("running");
            let background = segments[pg].core.background();
            let due = segments[pg].core.gossip_due(addresses.len());
            self.carry_out(node, pg, background)?;
            if let Some((index, message)) = due {
                let peer: usize = addresses[index].trim_start_matches("node-").parse().expect("node-i");
                let from = PEER_BASE + node as u64;
                self.send(|| Event::ToNode { node: peer, from, message: message.clone() });
            }
        }
        Ok(())
    }

    /// A peer's answer to a segment of node `node`.
    fn peer_answer_arrives(&mut self, node: usize, message: Message) -> Result<()> {
        if self.nodes[node].cut {
            return Ok(());
        }
        let Some(segments) = self.nodes[node].segments.as_mut() else { return Ok(()) };
        let (pg, actions) = match message {
            Message::RecordBatch(batch) => {
                let (pg, records) = (batch.pg.0 as usize, batch.records.len() as u64);
                let before = segments[pg].core.peer_repair_stats().records_received;
                let actions = segments[pg].core.gossip_received(batch);
                let taken = segments[pg].core.peer_repair_stats().records_received - before;
                if taken > records {
                    bail!("node {node} counted {taken} records from a batch of {records}");
                }
                self.gossip_records += taken;
                (pg, actions)
            }
            Message::HydrateBatch(batch) => {
                self.hydrate_batches += 1;
                let pg = batch.pg.0 as usize;
                (pg, segments[pg].core.hydrate_received(batch))
            }
            _ => return Ok(()), // a refusal: the segment asks another peer in time
        };
        self.carry_out(node, pg, actions)
    }

    fn crash(&mut self, node: usize) {
        self.nodes[node].segments = None; // writes in flight are lost
        self.crashes += 1;
        for frontend in &mut self.frontends {
            if let Some(writer) = frontend.writer() {
                for (pg, replica) in self.geometry.segments_on(NodeId(node as u32)) {
                    writer.segment_disconnected(pg, replica);
                }
            }
        }
    }

    fn start_frontend(&mut self) {
        let random = self.rng.below(u64::MAX);
        let mut core = RecoveryCore::new(self.geometry.clone(), random);
        let outgoing = core.start();
        self.frontends.push(Frontend {
            state: FrontendState::Recovering(Box::new(core)),
            read: None,
            next_request: 1,
            last_points: (Lsn::ZERO, Lsn::ZERO, Lsn::ZERO),
            pg_lsns: vec![BTreeSet::new(); PGS as usize],
            page_lsns: BTreeMap::new(),
        });
        let frontend = self.frontends.len() - 1;
        for (node, message) in outgoing {
            self.send_to_node(frontend, node, message);
        }
    }

    fn tick_frontend(&mut self, frontend: usize) -> Result<()> {
        let now = self.now;
        let outgoing = match &mut self.frontends[frontend].state {
            FrontendState::Recovering(core) => core.tick(),
            FrontendState::Writing(writer) => {
                if writer.tick(now) {
                    self.send_frames(frontend);
                }
                let mut asks = Vec::new();
                for node in 0..NODES as u32 {
                    for (pg, replica) in self.geometry.segments_on(NodeId(node)) {
                        if !self.frontends[frontend].writer().expect("writing").is_connected(pg, replica) {
                            asks.push((NodeId(node), Message::StatusRequest(StatusRequest { request_id: 0, pg })));
                        }
                    }
                }
                asks
            }
            FrontendState::Dead => return Ok(()),
        };
        for (node, message) in outgoing {
            self.send_to_node(frontend, node, message);
        }
        if self.frontends[frontend].read.as_ref().is_some_and(|read| now - read.sent_at > READ_TIMEOUT_MICROS) {
            self.end_read(frontend);
        }
        self.finish_recovery(frontend)
    }

    fn writer_step(&mut self, frontend: usize) -> Result<()> {
        let busy = self.frontends[frontend].read.is_some();
        let Some(writer) = self.frontends[frontend].writer() else { return Ok(()) };
        if writer.is_fenced() || self.allocated >= COMMITS {
            return Ok(());
        }
        let pages = 1 + self.rng.below(3);
        let changes: Vec<PageChange> = (0..pages)
            .map(|_| {
                let page = PageId(self.rng.below(u64::from(PGS) * PAGES_PER_PG));
                let offset = (self.rng.below(PAGE_BYTES as u64 / 8) * 8) as u32;
                let data = Bytes::from(self.rng.below(u64::MAX).to_le_bytes().to_vec());
                PageChange { page, op: PageOp::Write { offset, data } }
            })
            .collect();
        let writer = self.frontends[frontend].writer().expect("writing");
        let before = writer.points().highest_allocated;
        match writer.allocate(&changes) {
            Ok(last) => {
                let first = last.0 + 1 - changes.len() as u64;
                let epoch = self.frontends[frontend].writer().expect("writing").epoch();
                for (index, change) in changes.iter().enumerate() {
                    if let PageOp::Write { offset, data } = &change.op {
                        let lsn = Lsn(first + index as u64);
                        let prev_volume = if index == 0 { before } else { Lsn(lsn.0 - 1) };
                        let allocated = Allocated {
                            page: change.page,
                            offset: *offset as usize,
                            data: data.clone(),
                            prev_volume,
                            epoch,
                        };
                        // A writer whose recovery was overtaken by a newer
                        // one may allocate the same LSNs before it hears it
                        // is fenced: the newer epoch's record is the real one.
                        if self.records.get(&lsn).is_none_or(|held| held.epoch < epoch) {
                            self.records.insert(lsn, allocated);
                        }
                        let entry = &mut self.frontends[frontend];
                        entry.pg_lsns[(change.page.0 / PAGES_PER_PG) as usize].insert(lsn);
                        entry.page_lsns.entry(change.page).or_default().push(lsn);
                    }
                }
                self.allocated += 1;
                let writer = self.frontends[frontend].writer().expect("writing");
                if writer.wait_durable(last, last.0).is_some() {
                    bail!("a commit was durable the moment it was allocated");
                }
                self.send_frames(frontend);
            }
            Err(AllocationError::PageLsnUnknown { page }) if !busy => {
                self.begin_read(frontend, page, ReadPurpose::LearnLsn);
            }
            Err(_) => {
                // Blocked (allocation limit, a read it waits for): look again later.
                let pause = 500 + self.rng.below(1_000);
                self.schedule(pause, Event::WriterStep { frontend });
                return Ok(());
            }
        }
        let pause = self.rng.below(300);
        self.schedule(pause, Event::WriterStep { frontend });
        Ok(())
    }

    fn begin_read(&mut self, frontend: usize, page: PageId, purpose: ReadPurpose) {
        let now = self.now;
        let entry = &mut self.frontends[frontend];
        let request_id = entry.next_request;
        entry.next_request += 1;
        let Some(writer) = entry.writer() else { return };
        let pg = writer.geometry().pg_of(page).expect("in the volume");
        let point = writer.begin_read();
        let pg_point = writer.pg_read_point(pg, point);
        let targets: Vec<NodeId> = writer.read_targets(pg, pg_point).into_iter().map(|(_, node)| node).collect();
        entry.read = Some(PendingRead { request_id, point, page, targets, purpose, sent_at: now });
        self.send_read(frontend);
    }

    /// Sends the pending read to its next target, or ends it if none is left.
    fn send_read(&mut self, frontend: usize) {
        let now = self.now;
        let entry = &mut self.frontends[frontend];
        let (Some(read), FrontendState::Writing(writer)) = (entry.read.as_mut(), &entry.state) else { return };
        if read.targets.is_empty() {
            self.end_read(frontend);
            return;
        }
        let node = read.targets.remove(0);
        read.sent_at = now;
        let pg = writer.geometry().pg_of(read.page).expect("in the volume");
        let request = ReadPageRequest {
            request_id: read.request_id,
            pg,
            epoch: writer.epoch(),
            page: read.page,
            read_point: writer.pg_read_point(pg, read.point),
        };
        self.send_to_node(frontend, node, Message::ReadPage(request));
    }

    fn end_read(&mut self, frontend: usize) {
        let entry = &mut self.frontends[frontend];
        if let (Some(read), FrontendState::Writing(writer)) = (entry.read.take(), &mut entry.state) {
            writer.end_read(read.point);
        }
    }

    fn node_receives(&mut self, node: usize, from: u64, message: Message) -> Result<()> {
        if self.nodes[node].cut {
            return Ok(());
        }
        let Some(segments) = self.nodes[node].segments.as_mut() else { return Ok(()) };
        let reply = |message: Message| Event::FromNode { node, to: from, message };
        match message {
            Message::Append(request) => {
                let pg = request.pg.0 as usize;
                let segment_epoch = segments[pg].core.status(0).epoch;
                let stale = request.epoch < segment_epoch;
                let actions = segments[pg].core.append(request, from);
                if stale && !actions.iter().all(|action| matches!(action, Action::Refuse { .. })) {
                    bail!("node {node} took an append of an epoch older than its {segment_epoch}");
                }
                self.carry_out(node, pg, actions)?;
            }
            Message::StatusRequest(request) => {
                let status = segments[request.pg.0 as usize].core.status(request.request_id);
                self.send(|| reply(Message::Status(status)));
            }
            Message::SealEpoch(request) => {
                let pg = request.pg.0 as usize;
                let stale = request.epoch < segments[pg].core.status(0).epoch;
                let actions = segments[pg].core.seal(request.request_id, request.epoch, from);
                if stale && !actions.iter().all(|action| matches!(action, Action::Refuse { .. })) {
                    bail!("node {node} took a seal at an epoch older than its own");
                }
                self.carry_out(node, pg, actions)?;
            }
            Message::OpenEpoch(request) => {
                let pg = request.pg.0 as usize;
                let stale = request.epoch < segments[pg].core.status(0).epoch;
                let actions =
                    segments[pg].core.open_epoch(request.request_id, request.epoch, request.truncations, from);
                if stale && !actions.iter().all(|action| matches!(action, Action::Refuse { .. })) {
                    bail!("node {node} took an open at an epoch older than its own");
                }
                self.carry_out(node, pg, actions)?;
            }
            Message::SetMembership(request) => {
                let pg = request.pg.0 as usize;
                let actions =
                    segments[pg].core.set_membership(request.request_id, request.epoch, request.membership_epoch, from);
                self.carry_out(node, pg, actions)?;
            }
            Message::FetchRecords(request) => {
                let answer = match segments[request.pg.0 as usize].core.fetch_records(&request) {
                    Ok(batch) => Message::RecordBatch(batch),
                    Err(refusal) => Message::Error(common::message::ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                };
                self.send(|| reply(answer.clone()));
            }
            Message::Hydrate(request) => {
                let answer = match segments[request.pg.0 as usize].core.hydrate(&request) {
                    Ok(batch) => Message::HydrateBatch(batch),
                    Err(refusal) => Message::Error(common::message::ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                };
                self.send(|| reply(answer.clone()));
            }
            Message::ReadPage(request) => {
                let core = &segments[request.pg.0 as usize].core;
                let stale = request.epoch < core.status(0).epoch;
                let answer = match core.read_page(request.page, request.read_point, request.epoch) {
                    Ok(_) if stale => bail!("node {node} served a read of an epoch older than its own"),
                    Ok((page_lsn, image)) => Message::PageImage(common::message::PageImage {
                        request_id: request.request_id,
                        pg: request.pg,
                        page: request.page,
                        read_point: request.read_point,
                        page_lsn,
                        image,
                    }),
                    Err(refusal) => Message::Error(common::message::ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                };
                self.send(|| reply(answer.clone()));
            }
            other => bail!("unexpected message to a node: {other:?}"),
        }
        Ok(())
    }

    fn frontend_receives(&mut self, frontend: usize, node: usize, message: Message) -> Result<()> {
        let now = self.now;
        match &mut self.frontends[frontend].state {
            FrontendState::Dead => Ok(()),
            FrontendState::Recovering(core) => {
                let outgoing = core.receive(NodeId(node as u32), message);
                for (node, message) in outgoing {
                    self.send_to_node(frontend, node, message);
                }
                self.finish_recovery(frontend)
            }
            FrontendState::Writing(_) => {
                let request_id = self.frontends[frontend].next_request;
                self.frontends[frontend].next_request += 1;
                let pending = self.frontends[frontend].read.as_ref().map(|read| read.request_id);
                let replica_of = |pg: PgId| self.replica_of(pg, node);
                let waiters: Vec<u64> = match message {
                    Message::AppendAck(ack) => {
                        let replica = replica_of(ack.pg);
                        let writer = self.frontends[frontend].writer().expect("writing");
                        if writer.observe_epoch(Some(ack.epoch)).is_some() || writer.is_fenced() {
                            return Ok(());
                        }
                        let mut durable = writer.acknowledged(ack.pg, replica, ack.segment_complete_lsn, now);
                        if self.plant == Some(PlantedBug::AckCountedTwice) {
                            let other = ReplicaIndex((replica.0 + 1) % NODES as u8);
                            durable.waiters.extend(writer.acknowledged(ack.pg, other, ack.segment_complete_lsn, now));
                        }
                        durable.waiters
                    }
                    Message::Status(status) => {
                        let replica = replica_of(status.pg);
                        let writer = self.frontends[frontend].writer().expect("writing");
                        match writer.status_received(replica, &status, request_id, now) {
                            StatusOutcome::Fenced(_) => Vec::new(),
                            StatusOutcome::Open(request) => {
                                self.send_to_node(frontend, NodeId(node as u32), Message::OpenEpoch(request));
                                Vec::new()
                            }
                            StatusOutcome::SetMembership(request) => {
                                self.send_to_node(frontend, NodeId(node as u32), Message::SetMembership(request));
                                Vec::new()
                            }
                            StatusOutcome::Connected(durable) => durable.waiters,
                        }
                    }
                    Message::PageImage(image) if Some(image.request_id) == pending => {
                        self.check_read(frontend, image.page_lsn, &image.image)?;
                        self.end_read(frontend);
                        Vec::new()
                    }
                    Message::Error(error) if error.request_id != 0 && Some(error.request_id) == pending => {
                        self.send_read(frontend);
                        Vec::new()
                    }
                    Message::Error(error) if error.code == ErrorCode::StaleEpoch => {
                        self.frontends[frontend].writer().expect("writing").observe_epoch(None);
                        Vec::new()
                    }
                    Message::Error(error) if error.code == ErrorCode::NotOpen => {
                        let replica = replica_of(error.pg);
                        self.frontends[frontend].writer().expect("writing").segment_disconnected(error.pg, replica);
                        Vec::new()
                    }
                    Message::Error(error) if error.request_id == 0 => {
                        let replica = replica_of(error.pg);
                        self.frontends[frontend].writer().expect("writing").resend_from_complete(error.pg, replica);
                        Vec::new()
                    }
                    // A read given up on, or a late (duplicated) answer to its recovery.
                    Message::PageImage(_) | Message::Error(_) | Message::RecordBatch(_) => Vec::new(),
                    other => bail!("unexpected message to a writer: {other:?}"),
                };
                let epoch = self.frontends[frontend].writer().expect("writing").epoch();
                self.acknowledged.extend(waiters.into_iter().map(|lsn| (Lsn(lsn), epoch)));
                self.check_writer(frontend)?;
                self.send_frames(frontend);
                Ok(())
            }
        }
    }

    /// A recovering front end that decided becomes a writer (or starts over).
    fn finish_recovery(&mut self, frontend: usize) -> Result<()> {
        let FrontendState::Recovering(core) = &mut self.frontends[frontend].state else { return Ok(()) };
        let Some(result) = core.take_result() else { return Ok(()) };
        match result {
            Ok(log) => {
                let chain = self.check_recovered(&log)?;
                for lsn in chain {
                    let page = self.records[&lsn].page;
                    let entry = &mut self.frontends[frontend];
                    entry.pg_lsns[(page.0 / PAGES_PER_PG) as usize].insert(lsn);
                    entry.page_lsns.entry(page).or_default().push(lsn);
                }
                self.recoveries += 1;
                self.note(format!(
                    "{} front end {frontend} recovered: {} start {} vdl {} tail {}",
                    self.now,
                    log.epoch,
                    log.start,
                    log.volume_durable,
                    log.records.len()
                ));
                let writer = WriterCore::recovered(self.geometry.clone(), ALLOCATION_LIMIT, log);
                self.frontends[frontend].state = FrontendState::Writing(Box::new(writer));
                self.schedule(0, Event::WriterStep { frontend });
                self.schedule(100, Event::ReadStep { frontend });
            }
            Err(error) => {
                // An operator would start another recovery.
                self.note(format!("{} front end {frontend} gave up recovering: {error}", self.now));
                self.frontends[frontend].state = FrontendState::Dead;
                if frontend == self.frontends.len() - 1 {
                    self.schedule(10_000, Event::FrontendStarts);
                }
            }
        }
        Ok(())
    }

    /// The records on the volume chain that ends at `point`, ascending.
    fn chain(&self, point: Lsn) -> Result<Vec<Lsn>> {
        let mut chain = Vec::new();
        let mut lsn = point;
        while lsn > Lsn::ZERO {
            let Some(record) = self.records.get(&lsn) else {
                bail!("the volume chain from {point} reaches {lsn}, which no writer allocated");
            };
            chain.push(lsn);
            lsn = record.prev_volume;
        }
        chain.reverse();
        Ok(chain)
    }

    /// A page as `records` (LSNs, ascending) make it, and the last of them
    /// that changed it.
    fn model_page<'a>(&self, page: PageId, records: impl Iterator<Item = &'a Lsn>) -> (Lsn, Vec<u8>) {
        let mut image = vec![0u8; PAGE_BYTES];
        let mut last = Lsn::ZERO;
        for lsn in records {
            let record = &self.records[lsn];
            if record.page == page {
                image[record.offset..record.offset + record.data.len()].copy_from_slice(&record.data);
                last = *lsn;
            }
        }
        (last, image)
    }

    fn check_read(&mut self, frontend: usize, page_lsn: Lsn, image: &[u8]) -> Result<()> {
        let read = self.frontends[frontend].read.as_ref().expect("a read pending");
        let (point, page, purpose) = (read.point, read.page, read.purpose);
        let on_chain = self.frontends[frontend].page_lsns.get(&page).map(Vec::as_slice).unwrap_or_default();
        let (expected_lsn, expected) = self.model_page(page, on_chain.iter().take_while(|lsn| **lsn <= point));
        if image != &expected[..] || page_lsn != expected_lsn {
            bail!(
                "front end {frontend} read {page} at {point} (page LSN {page_lsn}): it differs from the model (page LSN {expected_lsn})"
            );
        }
        self.reads_checked += 1;
        if self.az_outage {
            self.reads_during_az_outage += 1;
        }
        if purpose == ReadPurpose::LearnLsn
            && let Some(writer) = self.frontends[frontend].writer()
        {
            writer.learn_page_lsn(page, page_lsn);
        }
        Ok(())
    }

    /// A recovery's decision keeps every commit a writer of an older epoch
    /// acknowledged, and invents nothing. (A racing recovery at a newer
    /// epoch may have acknowledged more meanwhile; it fences this one.)
    /// Returns the recovered volume chain.
    fn check_recovered(&mut self, log: &RecoveredLog) -> Result<BTreeSet<Lsn>> {
        let older: Vec<Lsn> =
            self.acknowledged.iter().filter(|(_, epoch)| **epoch < log.epoch).map(|(lsn, _)| *lsn).collect();
        if let Some(highest) = older.last()
            && *highest > log.volume_durable
        {
            bail!("recovery at {} found VDL {}, below acknowledged commit {highest}", log.epoch, log.volume_durable);
        }
        let chain: BTreeSet<Lsn> = self.chain(log.volume_durable)?.into_iter().collect();
        if let Some(lost) = older.iter().find(|lsn| !chain.contains(lsn)) {
            bail!(
                "recovery at {} lost acknowledged commit {lost}: it is not on the chain to {}",
                log.epoch,
                log.volume_durable
            );
        }
        for record in &log.records {
            let Some(allocated) = self.records.get(&record.lsn) else {
                bail!("recovery returned record {}, never allocated", record.lsn)
            };
            let op = PageOp::Write { offset: allocated.offset as u32, data: allocated.data.clone() };
            let same =
                record.op == op && record.page == allocated.page && record.prev_volume_lsn == allocated.prev_volume;
            if !same || !chain.contains(&record.lsn) {
                bail!("recovery returned record {} unlike the one allocated, or off the chain", record.lsn);
            }
        }
        Ok(chain)
    }

    fn restart(&mut self, node: usize) -> Result<()> {
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
        Ok(())
    }

    /// A segment's SCL never drops while its epoch and truncation list stay
    /// the same, not even across a restart.
    fn check_segment(&mut self, node: usize, pg: usize) -> Result<()> {
        let Some(segments) = self.nodes[node].segments.as_ref() else { return Ok(()) };
        let status = segments[pg].core.status(0);
        let scl = status.segment_complete_lsn;
        let state = &mut self.nodes[node];
        state.scl_seen[pg] = state.scl_seen[pg].max(scl);
        let (epoch, open_epoch, last) = state.scl_in_epoch[pg];
        if (epoch, open_epoch) == (status.epoch, status.open_epoch) && scl < last {
            bail!("node {node} PG {pg}: SCL went back from {last} to {scl} within {epoch}");
        }
        state.scl_in_epoch[pg] = (status.epoch, status.open_epoch, scl);
        Ok(())
    }

    /// PGCL is backed by four real SCLs (PGCL is a volume LSN: every record
    /// of the PG at or below it must be at or below the fourth-highest
    /// SCL); HA, VCL and VDL only move forward.
    fn check_writer(&mut self, frontend: usize) -> Result<()> {
        let entry = &mut self.frontends[frontend];
        let last_points = entry.last_points;
        let FrontendState::Writing(writer) = &entry.state else { return Ok(()) };
        for pg in 0..PGS as usize {
            let claimed_point = writer.pg_complete_lsn(PgId(pg as u32));
            let claimed = entry.pg_lsns[pg].range(..=claimed_point).next_back().copied().unwrap_or(Lsn::ZERO);
            let mut scls: Vec<Lsn> = self.nodes.iter().map(|node| node.scl_seen[pg]).collect();
            scls.sort_unstable_by(|a, b| b.cmp(a));
            if claimed > scls[3] {
                bail!(
                    "PG {pg}: writer {frontend}'s PGCL {claimed} is above the fourth-highest real SCL {} ({scls:?})",
                    scls[3]
                );
            }
        }
        let points = writer.points();
        let now = (points.highest_allocated, points.volume_complete, points.volume_durable);
        if now.0 < last_points.0 || now.1 < last_points.1 || now.2 < last_points.2 {
            bail!("writer {frontend}'s points went back: {last_points:?} -> {now:?}");
        }
        entry.last_points = now;
        Ok(())
    }

    /// Whether the run may end: the last writer is writing and everything
    /// it allocated is durable, and no log write is in flight.
    fn settled(&mut self) -> bool {
        let current = self.current();
        let Some(writer) = self.frontends[current].writer() else { return false };
        let points = writer.points();
        let pg_points: Vec<Lsn> = (0..PGS).map(|pg| writer.pg_read_point(PgId(pg), points.volume_durable)).collect();
        points.volume_durable == points.highest_allocated
            && self.nodes.iter().all(|node| {
                node.segments.as_ref().is_some_and(|segments| {
                    segments.iter().zip(&pg_points).all(|(segment, point)| {
                        segment.in_flight.is_none() && segment.core.segment_complete_lsn() >= *point
                    })
                })
            })
    }

    /// The end: every acknowledged commit is on the final chain, and every
    /// page read at VDL from every segment complete there equals the model.
    fn check_final(&mut self) -> Result<()> {
        let current = self.current();
        let writer = self.frontends[current].writer().expect("settled on a writer");
        let durable = writer.points().volume_durable;
        let points: Vec<Lsn> = (0..PGS).map(|pg| writer.pg_read_point(PgId(pg), durable)).collect();
        let chain = self.chain(durable)?;
        let on_chain: BTreeSet<Lsn> = chain.iter().copied().collect();
        if let Some(lost) = self.acknowledged.keys().find(|lsn| !on_chain.contains(lsn)) {
            bail!("acknowledged commit {lost} is not on the final volume chain to {durable}");
        }
        let mut read = 0;
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(segments) = node.segments.as_ref() else { continue };
            for pg in 0..PGS {
                let point = points[pg as usize];
                let segment = &segments[pg as usize];
                let status = segment.core.status(0);
                if !status.is_open() || status.segment_complete_lsn < point {
                    continue;
                }
                for page in (u64::from(pg) * PAGES_PER_PG)..(u64::from(pg) + 1) * PAGES_PER_PG {
                    let page = PageId(page);
                    let (_, image) = segment
                        .core
                        .read_page(page, point, status.epoch)
                        .map_err(|refusal| anyhow::anyhow!("node {index} {page} at {point}: {refusal:?}"))?;
                    let (_, expected) = self.model_page(page, chain.iter());
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
        Message::Status(status) => format!(
            "status {} {} open {} scl {}",
            status.pg, status.epoch, status.open_epoch, status.segment_complete_lsn
        ),
        Message::Error(error) => format!("error {} {:?}", error.pg, error.code),
        Message::StatusRequest(request) => format!("status? {}", request.pg),
        Message::SealEpoch(request) => format!("seal {} {}", request.pg, request.epoch),
        Message::OpenEpoch(request) => format!("open {} {} {:?}", request.pg, request.epoch, request.truncations),
        Message::FetchRecords(request) => format!("fetch {} above {}", request.pg, request.above),
        Message::RecordBatch(batch) => {
            format!(
                "records {} scl {} x{} more {}",
                batch.pg,
                batch.segment_complete_lsn,
                batch.records.len(),
                batch.more
            )
        }
        Message::ReadPage(read) => format!("read {} at {}", read.page, read.read_point),
        Message::PageImage(image) => format!("page {} lsn {}", image.page, image.page_lsn),
        other => format!("{other:?}"),
    };
    match event {
        Event::ToNode { node, from, message: m } => format!("{from} -> node {node}: {}", message(m)),
        Event::FromNode { node, to, message: m } => format!("node {node} -> {to}: {}", message(m)),
        other => format!("{other:?}"),
    }
}

/// Runs one seed; `Err` names the invariant that broke. Only the event
/// log's digest is kept.
pub fn run_seed(seed: u64, plant: Option<PlantedBug>) -> Result<SimReport> {
    run_seed_with(seed, plant, false).0
}

/// Runs one seed keeping its whole event log: in the report, or next to the error.
pub fn run_seed_logged(seed: u64, plant: Option<PlantedBug>) -> (Result<SimReport>, Vec<String>) {
    run_seed_with(seed, plant, true)
}

fn run_seed_with(seed: u64, plant: Option<PlantedBug>, verbose: bool) -> (Result<SimReport>, Vec<String>) {
    let mut world = World::new(seed, plant);
    world.verbose = verbose;
    let result = world.run(seed);
    let log = std::mem::take(&mut world.log);
    match result {
        Err(error) => (Err(error), log),
        Ok(()) => (
            Ok(SimReport {
                seed,
                commits_acknowledged: world.acknowledged.len() as u64,
                crashes: world.crashes,
                messages_dropped: world.dropped,
                recoveries: world.recoveries,
                frontend_failures: world.frontend_failures,
                reads_checked: world.reads_checked,
                reads_during_az_outage: world.reads_during_az_outage,
                gossip_records: world.gossip_records,
                hydrate_batches: world.hydrate_batches,
                digest: world.hasher.finish(),
                events: log,
            }),
            Vec::new(),
        ),
    }
}

impl World {
    fn run(&mut self, seed: u64) -> Result<()> {
        while let Some(Reverse((at, sequence))) = self.queue.pop() {
            let event = self.events.remove(&sequence).expect("scheduled");
            self.now = at;
            if self.now > DEADLINE_MICROS {
                bail!("seed {seed}: still running at {DEADLINE_MICROS} µs virtual time");
            }
            if self.allocated >= COMMITS && !self.healing {
                // The end: no more faults; every node comes back.
                self.healing = true;
                self.note(format!("{at} heal"));
                for node in 0..NODES {
                    self.nodes[node].cut = false;
                    self.restart(node)?;
                }
            }
            let fault = matches!(
                event,
                Event::Crash { .. } | Event::Cut { .. } | Event::AzOutage { .. } | Event::FrontendFails { .. }
            );
            if self.healing && fault {
                continue;
            }
            self.note_event(at, &event);
            self.step(event)?;
            if self.healing && self.settled() {
                break;
            }
        }
        self.check_final()
    }
}

/// `lab sim`: runs the seeds, stops at the first failure and prints how to replay it.
pub fn run(options: &SimOptions) -> Result<()> {
    if let Some(seed) = options.seed {
        let (result, failed_log) = run_seed_logged(seed, options.plant);
        let log = result.as_ref().map_or(&failed_log, |report| &report.events);
        for line in log {
            println!("{line}");
        }
        let report = result.map_err(|error| anyhow::anyhow!("seed {seed} failed: {error}"))?;
        println!("{}", summary(&report));
        return Ok(());
    }
    let mut totals = SimReport::default();
    let progress = indicatif::ProgressBar::new(options.seeds);
    for seed in 1..=options.seeds {
        match run_seed(seed, options.plant) {
            Ok(report) => {
                totals.absorb(&report);
                progress.inc(1);
            }
            Err(error) => {
                progress.abandon();
                let plant = options
                    .plant
                    .and_then(|bug| clap::ValueEnum::to_possible_value(&bug))
                    .map(|value| format!(" --plant {}", value.get_name()))
                    .unwrap_or_default();
                bail!("seed {seed} failed: {error}\nreplay: lab sim --seed {seed}{plant}");
            }
        }
    }
    progress.finish_and_clear();
    println!("{} seeds passed: {}", options.seeds, totals.counts());
    Ok(())
}

fn summary(report: &SimReport) -> String {
    format!("seed {}: {}, digest {:016x}", report.seed, report.counts(), report.digest)
}

impl SimReport {
    /// Adds another run's counts to these.
    fn absorb(&mut self, other: &SimReport) {
        self.commits_acknowledged += other.commits_acknowledged;
        self.crashes += other.crashes;
        self.messages_dropped += other.messages_dropped;
        self.recoveries += other.recoveries;
        self.frontend_failures += other.frontend_failures;
        self.reads_checked += other.reads_checked;
        self.reads_during_az_outage += other.reads_during_az_outage;
        self.gossip_records += other.gossip_records;
        self.hydrate_batches += other.hydrate_batches;
    }

    fn counts(&self) -> String {
        format!(
            "{} commits acknowledged, {} node crashes, {} messages dropped, {} recoveries ({} front-end crashes \
             or zombies), {} reads checked ({} during AZ+1 outages), {} records and {} page-state batches taken \
             from peers",
            self.commits_acknowledged,
            self.crashes,
            self.messages_dropped,
            self.recoveries,
            self.frontend_failures,
            self.reads_checked,
            self.reads_during_az_outage,
            self.gossip_records,
            self.hydrate_batches
        )
    }
}
