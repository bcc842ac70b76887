//! A seeded simulation of fencing on a block volume: six real
//! `BlockSegmentCore`s, lock holders that write to random subsets of them,
//! holders that die and whose late writes keep arriving anywhere, seals
//! whose three steps reach random quorums and interleave with everything
//! else, and segment restarts from their logs.
//!
//! Checked on every read, which meets a random set of at least three
//! segments and decides with the client's rule (`choose_current`):
//! - no acknowledged write (four segments took it) is lost;
//! - no write that every segment took only after its epoch's fence step
//!   completed is ever visible;
//! - the bytes returned are those of the version chosen.
//!
//! Checked on every delivery: a segment never takes a live epoch's write
//! as fenced, and a fenced segment never takes a fenced epoch's write.

use bytes::Bytes;
use common::block_message::{BlockImage, BlockRead, BlockWrite, FencePhase, FenceRequest};
use common::ids::{BlockId, IdHashSet, PgId};
use common::message::{ErrorCode, Message};
use common::rng::SimRng;
use std::collections::{BTreeMap, BTreeSet};
use storage_node::block_client::{REPLICAS, choose_current};
use storage_node::block_segment::{BlockAction, BlockSegmentConfig, BlockSegmentCore};
use storage_node::disk::{LogDisk, MemoryDisk};
use storage_node::log_format::scan_log;

const BLOCKS: u64 = 4;
const OPERATIONS: usize = 250;
const PG: PgId = PgId(0);

struct Segment {
    core: BlockSegmentCore,
    disk: MemoryDisk,
}

impl Segment {
    fn config() -> BlockSegmentConfig {
        BlockSegmentConfig { log_file_bytes: 256 * 1024, log_files_target: 2, ..BlockSegmentConfig::new(PG, 1024, 64) }
    }

    fn new() -> Segment {
        let (core, actions) = BlockSegmentCore::create(Self::config()).expect("config");
        let mut segment = Segment { core, disk: MemoryDisk::new() };
        segment.run(actions);
        segment
    }

    /// Carries out actions (the memory disk completes writes at once) and
    /// returns the answer sent.
    fn run(&mut self, actions: Vec<BlockAction>) -> Option<Message> {
        let mut answer = None;
        let mut pending = actions;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for action in pending {
                match action {
                    BlockAction::Write(write) => {
                        let id = write.id;
                        self.disk.write_durable(write, Box::new(|_| {})).expect("at once").expect("written");
                        next.extend(self.core.write_done(id));
                    }
                    BlockAction::Send { message, .. } => answer = Some(message),
                    BlockAction::DeleteFile(file) => self.disk.delete_file(file).expect("deleted"),
                }
            }
            pending = next;
        }
        answer
    }

    fn write(&mut self, write: BlockWrite) -> Message {
        let actions = self.core.write(write, 1);
        self.run(actions).expect("a write is answered")
    }

    fn fence(&mut self, epoch: u64, phase: FencePhase) -> Message {
        let request = FenceRequest { request_id: 1, pg: PG, lease_epoch: epoch, phase, from_block: BlockId(0) };
        let actions = self.core.fence(request, 1);
        self.run(actions).expect("a fence is answered")
    }

    fn read(&self, block: BlockId, want_token: u64) -> BlockImage {
        match self.core.read(&BlockRead { request_id: 1, pg: PG, block, want_token, sealed_cursor: 0 }) {
            Message::BlockImage(image) => image,
            other => panic!("read refused: {other:?}"),
        }
    }

    fn restart(&mut self) {
        let files = self.disk.read_all().expect("read back");
        let (core, corruptions) = BlockSegmentCore::recover(Self::config(), scan_log(&files)).expect("recovers");
        assert_eq!(corruptions, 0);
        self.core = core;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SealStage {
    Dying,
    Fenced { fenced: Vec<usize>, lists: BTreeMap<BlockId, ((u64, u64), Vec<usize>)> },
    Repaired { fenced: Vec<usize> },
    Sealed,
}

/// What is known of one version of a block.
#[derive(Clone, Debug)]
struct Facts {
    epoch: u64,
    data: Bytes,
    /// Some segment took it before its epoch's fence step completed (or
    /// its epoch is live): it may be visible.
    in_time: bool,
}

#[derive(Clone, Copy, Debug)]
struct Holder {
    epoch: u64,
    token: u64,
}

struct World {
    rng: SimRng,
    segments: Vec<Segment>,
    live: BTreeSet<u64>,
    dead: BTreeMap<u64, SealStage>,
    holders: BTreeMap<BlockId, Holder>,
    /// The blocks (and tokens) whose locks each dead epoch held when it died.
    held_at_death: BTreeMap<u64, Vec<(BlockId, u64)>>,
    /// The segments each seal's fence step reached.
    fence_quorums: BTreeMap<u64, Vec<usize>>,
    next_epoch: u64,
    next_token: u64,
    next_version: u64,
    acked: BTreeMap<BlockId, (u64, u64)>,
    versions: BTreeMap<(BlockId, (u64, u64)), Facts>,
    log: Vec<String>,
    reads_checked: usize,
}

impl World {
    fn new(seed: u64) -> World {
        let mut world = World {
            rng: SimRng::new(seed),
            segments: (0..REPLICAS).map(|_| Segment::new()).collect(),
            live: BTreeSet::new(),
            dead: BTreeMap::new(),
            holders: BTreeMap::new(),
            held_at_death: BTreeMap::new(),
            fence_quorums: BTreeMap::new(),
            next_epoch: 1,
            next_token: 1,
            next_version: 1,
            acked: BTreeMap::new(),
            versions: BTreeMap::new(),
            log: Vec::new(),
            reads_checked: 0,
        };
        for block in 0..BLOCKS {
            let epoch = world.live_epoch();
            world.grant(BlockId(block), epoch);
        }
        world
    }

    /// A live epoch, sometimes a new one.
    fn live_epoch(&mut self) -> u64 {
        if self.live.is_empty() || self.rng.chance(0.3) {
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            self.live.insert(epoch);
            return epoch;
        }
        let live: Vec<u64> = self.live.iter().copied().collect();
        live[self.rng.below(live.len() as u64) as usize]
    }

    fn grant(&mut self, block: BlockId, epoch: u64) {
        self.holders.insert(block, Holder { epoch, token: self.next_token });
        self.next_token += 1;
    }

    /// A random subset of `from` with at least `least` members.
    fn subset(&mut self, from: &[usize], least: usize) -> Vec<usize> {
        let mut chosen: Vec<usize> = from.to_vec();
        let size = least + self.rng.below((from.len() - least + 1) as u64) as usize;
        while chosen.len() > size {
            chosen.remove(self.rng.below(chosen.len() as u64) as usize);
        }
        chosen
    }

    fn fence_step_done(&self, epoch: u64) -> bool {
        matches!(self.dead.get(&epoch), Some(stage) if *stage != SealStage::Dying)
    }

    fn fenced_segments(&self, epoch: u64) -> Vec<usize> {
        match self.dead.get(&epoch) {
            Some(SealStage::Fenced { fenced, .. } | SealStage::Repaired { fenced }) => fenced.clone(),
            _ => Vec::new(),
        }
    }

    /// Sends a write of `holder` to each segment with probability 0.8.
    fn deliver(&mut self, block: BlockId, holder: Holder) -> Result<(), String> {
        let version = self.next_version;
        self.next_version += 1;
        let key = (holder.token, version);
        let data = Bytes::from(format!("{}:{}:{}:{}", block.0, holder.epoch, holder.token, version));
        let write = BlockWrite {
            request_id: 1,
            pg: PG,
            block,
            version,
            lease_epoch: holder.epoch,
            fencing_token: holder.token,
            repair: false,
            data: data.clone(),
        };
        let live = self.live.contains(&holder.epoch);
        let fence_done = self.fence_step_done(holder.epoch);
        let fenced = self.fenced_segments(holder.epoch);
        let mut took = Vec::new();
        for replica in 0..REPLICAS {
            if !self.rng.chance(0.8) {
                continue;
            }
            match self.segments[replica].write(write.clone()) {
                Message::BlockWriteAck(_) => took.push(replica),
                Message::Error(error) if error.code == ErrorCode::FencedEpoch && live => {
                    return Err(format!("segment {replica} refused live epoch {} as fenced", holder.epoch));
                }
                Message::Error(error) if error.code == ErrorCode::StaleFencingToken && live => {
                    return Err(format!("segment {replica} refused the current holder's token: {}", error.message));
                }
                _ => {}
            }
        }
        if let Some(replica) = took.iter().find(|replica| fenced.contains(replica)) {
            return Err(format!("fenced segment {replica} took a write of fenced epoch {}", holder.epoch));
        }
        self.log.push(format!("write {block} {holder:?} v{version} live={live} took {took:?}"));
        if took.is_empty() {
            return Ok(());
        }
        self.versions.insert((block, key), Facts { epoch: holder.epoch, data, in_time: live || !fence_done });
        if live && took.len() >= 4 {
            let acked = self.acked.entry(block).or_insert(key);
            *acked = (*acked).max(key);
        }
        Ok(())
    }

    /// The next step of one dying epoch's seal, with random quorums.
    fn advance_seal(&mut self, epoch: u64) -> Result<(), String> {
        let stage = self.dead[&epoch].clone();
        let next = match stage {
            SealStage::Dying => {
                let fenced = self.subset(&(0..REPLICAS).collect::<Vec<_>>(), 4);
                let mut lists: BTreeMap<BlockId, ((u64, u64), Vec<usize>)> = BTreeMap::new();
                for &replica in &fenced {
                    let Message::FenceAck(ack) = self.segments[replica].fence(epoch, FencePhase::Fence) else {
                        return Err(format!("segment {replica} refused to fence {epoch}"));
                    };
                    for listed in ack.blocks {
                        let key = (listed.fencing_token, listed.version);
                        let best = lists.entry(listed.block).or_insert((key, Vec::new()));
                        if key > best.0 {
                            *best = (key, Vec::new());
                        }
                        if key == best.0 {
                            best.1.push(replica);
                        }
                    }
                }
                self.fence_quorums.insert(epoch, fenced.clone());
                SealStage::Fenced { fenced, lists }
            }
            SealStage::Fenced { fenced, lists } => {
                for (block, ((token, version), holders)) in lists {
                    // As the client does: the first listing replica that still holds it.
                    let source = holders.iter().map(|holder| self.segments[*holder].read(block, token)).find(|image| {
                        image.data_token == token && image.history.iter().any(|held| held.key() == (token, version))
                    });
                    let Some(image) = source else {
                        self.log.push(format!("repair of {block} skipped: superseded everywhere it was listed"));
                        continue;
                    };
                    let repair = BlockWrite {
                        request_id: 1,
                        pg: PG,
                        block,
                        version,
                        lease_epoch: epoch,
                        fencing_token: token,
                        repair: true,
                        data: image.data,
                    };
                    for replica in self.subset(&fenced, 4) {
                        // As the client does: a superseded repair counts (the
                        // segment keeps four later grants' versions).
                        let answer = self.segments[replica].write(repair.clone());
                        let superseded =
                            matches!(&answer, Message::Error(error) if error.code == ErrorCode::Superseded);
                        if !matches!(answer, Message::BlockWriteAck(_)) && !superseded {
                            return Err(format!("fenced segment {replica} refused a repair of {block}"));
                        }
                    }
                }
                SealStage::Repaired { fenced }
            }
            SealStage::Repaired { fenced } => {
                for replica in self.subset(&fenced, 4) {
                    if !matches!(self.segments[replica].fence(epoch, FencePhase::Sealed), Message::FenceAck(_)) {
                        return Err(format!("fenced segment {replica} refused to seal {epoch}"));
                    }
                }
                // Only now may the dead epoch's locks move on.
                let orphaned: Vec<BlockId> =
                    self.holders.iter().filter(|(_, holder)| holder.epoch == epoch).map(|(block, _)| *block).collect();
                for block in orphaned {
                    let heir = self.live_epoch();
                    self.grant(block, heir);
                }
                SealStage::Sealed
            }
            SealStage::Sealed => return Ok(()),
        };
        self.log.push(format!("seal {epoch} -> {next:?}"));
        self.dead.insert(epoch, next);
        Ok(())
    }

    /// A write of a dead epoch to a block whose lock it held when it died,
    /// arriving late; or a copy of any earlier write, arriving again. (A
    /// clerk that released a lock had every write under it acknowledged
    /// first, so only copies of those can still be on the way.)
    fn late_write(&mut self, epoch: u64) -> Result<(), String> {
        if self.rng.chance(0.3) && !self.versions.is_empty() {
            let written: Vec<(BlockId, (u64, u64))> = self.versions.keys().copied().collect();
            let (block, (token, version)) = written[self.rng.below(written.len() as u64) as usize];
            let facts = self.versions[&(block, (token, version))].clone();
            let copy = BlockWrite {
                request_id: 1,
                pg: PG,
                block,
                version,
                lease_epoch: facts.epoch,
                fencing_token: token,
                repair: false,
                data: facts.data,
            };
            let fenced = self.fenced_segments(facts.epoch);
            for replica in 0..REPLICAS {
                let held_before =
                    self.segments[replica].read(block, token).history.iter().any(|held| held.key() == (token, version));
                let took = matches!(self.segments[replica].write(copy.clone()), Message::BlockWriteAck(_));
                if took && fenced.contains(&replica) && !held_before {
                    return Err(format!("fenced segment {replica} took a copy of fenced epoch {}", facts.epoch));
                }
            }
            self.log.push(format!("copy of {block} {:?} delivered again", (token, version)));
            return Ok(());
        }
        let held = self.held_at_death.get(&epoch).cloned().unwrap_or_default();
        let Some(&(block, token)) = held.get(self.rng.below(held.len().max(1) as u64) as usize) else {
            return Ok(());
        };
        self.deliver(block, Holder { epoch, token })
    }

    /// A fence (and sometimes the seal) that missed its quorum reaches a
    /// segment late, maybe after that segment took late writes.
    fn straggling_fence(&mut self) {
        let quorums: Vec<(u64, Vec<usize>)> = self.fence_quorums.iter().map(|(e, f)| (*e, f.clone())).collect();
        let Some((epoch, quorum)) = quorums.get(self.rng.below(quorums.len().max(1) as u64) as usize).cloned() else {
            return;
        };
        let outside: Vec<usize> = (0..REPLICAS).filter(|replica| !quorum.contains(replica)).collect();
        let Some(&replica) = outside.get(self.rng.below(outside.len().max(1) as u64) as usize) else { return };
        self.segments[replica].fence(epoch, FencePhase::Fence);
        if self.dead.get(&epoch) == Some(&SealStage::Sealed) && self.rng.chance(0.5) {
            self.segments[replica].fence(epoch, FencePhase::Sealed);
        }
        self.log.push(format!("straggling fence of {epoch} reaches segment {replica}"));
    }

    /// Reads `block` from a random set of at least three segments and checks it.
    fn read(&mut self, block: BlockId) -> Result<(), String> {
        let holder = self.holders[&block];
        if matches!(self.dead.get(&holder.epoch), Some(stage) if *stage != SealStage::Sealed) {
            return Ok(()); // its lock is with a dead holder until the seal ends: nobody reads
        }
        let responders = self.subset(&(0..REPLICAS).collect::<Vec<_>>(), 3);
        let images: Vec<(usize, BlockImage)> =
            responders.iter().map(|replica| (*replica, self.segments[*replica].read(block, 0))).collect();
        let sealed: IdHashSet<u64> = images.iter().flat_map(|(_, image)| image.sealed.iter().copied()).collect();
        let chosen = choose_current(&images, &sealed);
        self.reads_checked += 1;
        self.log.push(format!("read {block} from {responders:?}: {chosen:?}"));
        let acked = self.acked.get(&block).copied();
        let Some((replica, version)) = chosen else {
            return match acked {
                Some(key) => Err(format!("{block}: acknowledged {key:?} lost, read found nothing")),
                None => Ok(()),
            };
        };
        if acked.is_some_and(|key| version.key() < key) {
            return Err(format!("{block}: read {:?} below acknowledged {acked:?}", version.key()));
        }
        let facts =
            self.versions.get(&(block, version.key())).ok_or_else(|| format!("{block}: {version:?} never written"))?;
        if !facts.in_time {
            return Err(format!("{block}: late write {version:?} of fenced epoch {} visible", version.lease_epoch));
        }
        let data = self.segments[replica].read(block, version.fencing_token).data;
        if data != facts.data {
            return Err(format!("{block}: bytes of {version:?} differ"));
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        let block = BlockId(self.rng.below(BLOCKS));
        match self.rng.below(100) {
            0..35 => {
                let holder = self.holders[&block];
                if self.live.contains(&holder.epoch) {
                    self.deliver(block, holder)?;
                }
            }
            35..40 => {
                // The lock moves to another live holder (after a normal revoke).
                let holder = self.holders[&block];
                if self.live.contains(&holder.epoch) {
                    let epoch = self.live_epoch();
                    self.grant(block, epoch);
                }
            }
            40..45 => {
                let live: Vec<u64> = self.live.iter().copied().collect();
                if let Some(&epoch) = live.get(self.rng.below(live.len().max(1) as u64) as usize) {
                    self.live.remove(&epoch);
                    self.dead.insert(epoch, SealStage::Dying);
                    let held = self
                        .holders
                        .iter()
                        .filter(|(_, holder)| holder.epoch == epoch)
                        .map(|(block, holder)| (*block, holder.token))
                        .collect();
                    self.held_at_death.insert(epoch, held);
                    self.log.push(format!("epoch {epoch} dies"));
                }
            }
            45..60 => {
                let dying: Vec<u64> = self
                    .dead
                    .iter()
                    .filter(|(_, stage)| **stage != SealStage::Sealed)
                    .map(|(epoch, _)| *epoch)
                    .collect();
                if let Some(&epoch) = dying.get(self.rng.below(dying.len().max(1) as u64) as usize) {
                    self.advance_seal(epoch)?;
                }
            }
            60..75 => {
                let dead: Vec<u64> = self.dead.keys().copied().collect();
                if let Some(&epoch) = dead.get(self.rng.below(dead.len().max(1) as u64) as usize) {
                    self.late_write(epoch)?;
                }
            }
            75..78 => {
                let replica = self.rng.below(REPLICAS as u64) as usize;
                self.segments[replica].restart();
                self.log.push(format!("segment {replica} restarts"));
            }
            78..83 => self.straggling_fence(),
            _ => self.read(block)?,
        }
        Ok(())
    }
}

fn run(seed: u64) -> Result<World, String> {
    let mut world = World::new(seed);
    for _ in 0..OPERATIONS {
        world.step().map_err(|error| format!("seed {seed}: {error}\n{}", world.log.join("\n")))?;
    }
    // Finish every seal, then read every block (from a random set of three).
    let dying: Vec<u64> = world.dead.keys().copied().collect();
    for epoch in dying {
        for _ in 0..3 {
            world.advance_seal(epoch).map_err(|error| format!("seed {seed}: {error}"))?;
        }
    }
    for block in 0..BLOCKS {
        world.read(BlockId(block)).map_err(|error| format!("seed {seed}: {error}\n{}", world.log.join("\n")))?;
    }
    Ok(world)
}

#[test]
fn fencing_keeps_late_writes_invisible_and_acknowledged_writes_visible_over_many_seeds() {
    let (mut reads, mut late_writes_refused_or_hidden) = (0, 0);
    for seed in 0..400 {
        let world = run(seed).unwrap_or_else(|failure| panic!("{failure}"));
        reads += world.reads_checked;
        late_writes_refused_or_hidden += world.versions.values().filter(|facts| !facts.in_time).count();
    }
    assert!(reads > 10_000, "the simulation checked too few reads: {reads}");
    assert!(
        late_writes_refused_or_hidden > 100,
        "too few late writes were taken anywhere: {late_writes_refused_or_hidden}"
    );
}

#[test]
fn a_seed_replays_exactly() {
    let first = run(42).expect("seed 42");
    let second = run(42).expect("seed 42");
    assert_eq!(first.log, second.log);
}
