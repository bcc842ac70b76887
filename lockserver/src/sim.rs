//! A seeded simulation of one lock server and several clerks.
//!
//! Everything runs on simulated time from one event queue, so a seed
//! replays exactly (the run's event-log hash is part of the report). The
//! network drops, duplicates, delays and reorders messages, sometimes by
//! more than a lease; clerks crash and restart; workstations run
//! operations that take locks, write to a fencing storage model while they
//! hold an exclusive lock, flush on revoke, and replay dead clerks' logs.
//! The server crashes too, losing everything but its saved registry, and
//! restarts: clerks reclaim their locks during its grace period.
//! After `faults_until` the network is clean and nobody crashes; operations
//! stop at `operations_until`, and the run ends at `end`.
//!
//! Checked after every event:
//! - no two clerks with valid leases hold conflicting modes of one lock;
//! - the server's own invariants ([`LockServerCore::check_invariants`]);
//! - storage never accepts a write from a fenced epoch, and a dead lease's
//!   locks are never released before its fence is durable;
//! - a fencing token granted for the first time is above every token of
//!   that lock granted before, by any run of the server;
//! - no reclaim after a server restart is refused as conflicting.
//!
//! Checked at the end (liveness): every operation that asked for a lock
//! got it, no request is queued at the server, and every dead lease was
//! recovered.

use crate::clerk::{Acquire, ClerkConfig, ClerkCore, ClerkOutput};
use crate::protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, Mode, ToClerk, ToServer};
use crate::registry::ServerRegistry;
use crate::server::{LockServerCore, ServerConfig, ServerOutput};
use common::rng::SimRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// The shape of a simulated run. Times are in microseconds.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub clerks: u64,
    pub locks: u64,
    pub server: ServerConfig,
    pub clerk: ClerkConfig,
    pub drop_probability: f64,
    pub duplicate_probability: f64,
    /// Most delay of a message in the normal case.
    pub delay_max: u64,
    /// Probability that a message is held back by up to `long_delay_max`.
    pub long_delay_probability: f64,
    pub long_delay_max: u64,
    /// Probability per operation start that a random clerk crashes.
    pub crash_probability: f64,
    /// Probability per operation start that the lock server crashes (it
    /// restarts after up to half a lease).
    pub server_crash_probability: f64,
    pub faults_until: u64,
    pub operations_until: u64,
    pub end: u64,
    /// Once the faults have stopped and their leases have run out, no
    /// operation may wait longer than this. `None` for shapes that offer
    /// more load than the locks can serve (queues then grow until the
    /// operations stop; only the final drain is checked).
    pub max_wait: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            clerks: 3,
            locks: 4,
            server: ServerConfig { lease_micros: 200_000, retransmit_micros: 30_000 },
            clerk: ClerkConfig { lease_margin_micros: 20_000, renew_every_micros: 50_000, retransmit_micros: 30_000 },
            drop_probability: 0.05,
            duplicate_probability: 0.02,
            delay_max: 3_000,
            long_delay_probability: 0.01,
            long_delay_max: 300_000,
            crash_probability: 0.004,
            server_crash_probability: 0.002,
            faults_until: 1_000_000,
            operations_until: 2_400_000,
            end: 3_200_000,
            max_wait: Some(600_000),
        }
    }
}

impl SimConfig {
    /// Three times the message loss, five times the duplicates and long
    /// delays, more crashes, and five clerks fighting over three locks.
    pub fn heavy_faults() -> Self {
        SimConfig {
            clerks: 5,
            locks: 3,
            drop_probability: 0.15,
            duplicate_probability: 0.1,
            long_delay_probability: 0.05,
            crash_probability: 0.01,
            server_crash_probability: 0.004,
            ..SimConfig::default()
        }
    }

    /// Eight clerks over sixteen locks: more traffic than the locks can
    /// serve while operations keep coming, so waits are only checked to
    /// drain once they stop.
    pub fn many_clerks() -> Self {
        SimConfig { clerks: 8, locks: 16, max_wait: None, ..SimConfig::default() }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimReport {
    pub events: u64,
    pub operations: u64,
    pub grants: u64,
    pub crashes: u64,
    pub server_restarts: u64,
    pub leases_lost: u64,
    pub recoveries: u64,
    pub writes_accepted: u64,
    pub writes_refused: u64,
    /// FNV-1a over every processed event: equal for equal seeds. (Not in
    /// summaries of many runs, where it means nothing.)
    #[serde(skip)]
    pub log_hash: u64,
}

impl SimReport {
    /// Adds another run's counts (not its hash) to these.
    pub fn add(&mut self, other: &SimReport) {
        self.events += other.events;
        self.operations += other.operations;
        self.grants += other.grants;
        self.crashes += other.crashes;
        self.server_restarts += other.server_restarts;
        self.leases_lost += other.leases_lost;
        self.recoveries += other.recoveries;
        self.writes_accepted += other.writes_accepted;
        self.writes_refused += other.writes_refused;
    }
}

#[derive(Clone, Debug)]
enum Event {
    ServerTick,
    ClerkTick(ClerkId),
    ToServer(ClerkId, ToServer),
    ToClerk(ClerkId, ToClerk),
    /// The fence the server run `incarnation` asked for is durable.
    FenceDurable {
        epoch: LeaseEpoch,
        incarnation: u64,
    },
    OperationStart(ClerkId),
    OperationEnd {
        clerk: ClerkId,
        incarnation: u64,
        operation: u64,
    },
    FlushDone {
        clerk: ClerkId,
        incarnation: u64,
        lock: LockName,
    },
    RecoveryDone {
        clerk: ClerkId,
        incarnation: u64,
        dead: LeaseEpoch,
    },
    /// A write to shared storage, stamped when it was sent.
    Write {
        lock: LockName,
        epoch: LeaseEpoch,
        token: FencingToken,
    },
    Crash(ClerkId),
    Restart(ClerkId),
    ServerCrash,
    ServerRestart,
}

/// An event due at `time`; `sequence` orders events due at the same time.
#[derive(Debug)]
struct Scheduled {
    time: u64,
    sequence: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.sequence) == (other.time, other.sequence)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, self.sequence).cmp(&(other.time, other.sequence))
    }
}

/// A workstation operation: it takes its locks in sorted order (F97 §5,
/// phase 2), holding the earlier ones while it waits for the next.
#[derive(Clone, Debug)]
struct Operation {
    id: u64,
    locks: Vec<(LockName, Mode)>,
    /// How many of `locks` it holds.
    held: usize,
    started: u64,
}

#[derive(Debug)]
struct Workstation {
    core: Option<ClerkCore>,
    incarnation: u64,
    /// Operations waiting for their next lock.
    waiting: Vec<Operation>,
    /// Operations holding all their locks, until they end.
    running: BTreeMap<u64, Operation>,
}

/// Shared storage as far as fencing goes.
#[derive(Debug, Default)]
struct Storage {
    fenced: BTreeSet<LeaseEpoch>,
    newest_token: BTreeMap<LockName, FencingToken>,
}

struct Sim {
    config: SimConfig,
    rng: SimRng,
    now: u64,
    sequence: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    server: LockServerCore,
    /// False while the server is down; `server_incarnation` counts its runs.
    server_up: bool,
    server_incarnation: u64,
    /// What the server last saved: all a restart starts from.
    saved_registry: ServerRegistry,
    /// Per lock, every fencing token granted so far, by any run.
    tokens_granted: BTreeMap<LockName, BTreeSet<FencingToken>>,
    workstations: BTreeMap<ClerkId, Workstation>,
    storage: Storage,
    /// Dead leases whose locks the server released (after recovery).
    released_dead: BTreeSet<LeaseEpoch>,
    next_attempt: u64,
    report: SimReport,
}

/// Runs one seeded simulation; `Err` names the first broken property.
pub fn run(seed: u64, config: &SimConfig) -> Result<SimReport, String> {
    run_with_log(seed, config, None)
}

/// [`run`], also collecting every processed event as a line of text (for
/// replaying a failing seed: `lab sim --seed S --log`).
pub fn run_logged(seed: u64, config: &SimConfig) -> (Result<SimReport, String>, Vec<String>) {
    let mut log = Vec::new();
    let result = run_with_log(seed, config, Some(&mut log));
    (result, log)
}

fn run_with_log(seed: u64, config: &SimConfig, mut log: Option<&mut Vec<String>>) -> Result<SimReport, String> {
    let mut sim = Sim {
        config: config.clone(),
        rng: SimRng::new(seed),
        now: 0,
        sequence: 0,
        queue: BinaryHeap::new(),
        server: LockServerCore::new(config.server),
        server_up: true,
        server_incarnation: 1,
        saved_registry: ServerRegistry::default(),
        tokens_granted: BTreeMap::new(),
        workstations: BTreeMap::new(),
        storage: Storage::default(),
        released_dead: BTreeSet::new(),
        next_attempt: 1,
        report: SimReport { log_hash: 0xcbf2_9ce4_8422_2325, ..SimReport::default() },
    };
    sim.schedule(0, Event::ServerTick);
    for index in 0..config.clerks {
        let clerk = ClerkId(index);
        sim.workstations
            .insert(clerk, Workstation { core: None, incarnation: 0, waiting: Vec::new(), running: BTreeMap::new() });
        sim.start_clerk(clerk);
        sim.schedule(index * 1_000, Event::ClerkTick(clerk));
        sim.schedule(5_000 + index * 1_700, Event::OperationStart(clerk));
    }
    while let Some(Reverse(Scheduled { time, event, .. })) = sim.queue.pop() {
        if time > sim.config.end {
            break;
        }
        sim.now = time;
        sim.report.events += 1;
        let line = format!("{time} {event:?}");
        sim.hash(&line);
        if let Some(log) = log.as_deref_mut() {
            log.push(line);
        }
        sim.process(event)?;
        sim.check_safety()?;
        sim.check_users()?;
        sim.check_progress()?;
    }
    sim.check_liveness()?;
    Ok(sim.report)
}

impl Sim {
    fn faulty(&self) -> bool {
        self.now < self.config.faults_until
    }

    fn schedule(&mut self, delay: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse(Scheduled { time: self.now + delay, sequence: self.sequence, event }));
    }

    fn hash(&mut self, text: &str) {
        for byte in text.bytes() {
            self.report.log_hash = (self.report.log_hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn random_delay(&mut self) -> u64 {
        if self.faulty() && self.rng.chance(self.config.long_delay_probability) {
            self.rng.below(self.config.long_delay_max) + 1
        } else {
            self.rng.below(self.config.delay_max) + 1
        }
    }

    /// Sends `event` over the network: maybe lost, maybe twice, delayed.
    fn transmit(&mut self, event: Event) {
        if self.faulty() && self.rng.chance(self.config.drop_probability) {
            return;
        }
        if self.faulty() && self.rng.chance(self.config.duplicate_probability) {
            let delay = self.random_delay();
            self.schedule(delay, event.clone());
        }
        let delay = self.random_delay();
        self.schedule(delay, event);
    }

    fn start_clerk(&mut self, clerk: ClerkId) {
        let attempt = self.next_attempt;
        self.next_attempt += 1_000;
        let (core, out) = ClerkCore::new(clerk, self.config.clerk, attempt, self.now);
        let workstation = self.workstations.get_mut(&clerk).expect("known clerk");
        workstation.core = Some(core);
        workstation.incarnation += 1;
        workstation.waiting.clear();
        workstation.running.clear();
        self.clerk_outputs(clerk, out);
    }

    fn process(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::ServerTick => {
                if self.server_up {
                    let out = self.server.tick(self.now);
                    self.server_outputs(out)?;
                }
                self.schedule(10_000, Event::ServerTick);
            }
            Event::ServerCrash => {
                if self.server_up {
                    self.server_up = false;
                    self.server_incarnation += 1;
                    self.report.server_restarts += 1;
                    let downtime = self.rng.below(self.config.server.lease_micros / 2) + 1;
                    self.schedule(downtime, Event::ServerRestart);
                }
            }
            Event::ServerRestart => {
                let (server, out) = LockServerCore::restart(self.config.server, self.saved_registry.clone(), self.now);
                self.server = server;
                self.server_up = true;
                self.server_outputs(out)?;
            }
            Event::ClerkTick(clerk) => {
                if let Some(out) = self.with_core(clerk, |core, now| core.tick(now)) {
                    self.clerk_outputs(clerk, out);
                }
                self.schedule(10_000, Event::ClerkTick(clerk));
            }
            Event::ToServer(_, _) if !self.server_up => {}
            Event::ToServer(from, message) => {
                let recovery = match &message {
                    ToServer::RecoveryDone { dead, .. } => Some(*dead),
                    _ => None,
                };
                let dead_before = self.server.dead_sessions();
                let out = self.server.handle(from, message, self.now);
                if let Some(dead) = recovery
                    && self.server.dead_sessions() < dead_before
                {
                    if !self.storage.fenced.contains(&dead) {
                        return Err(format!("{dead:?}'s locks were released before its fence was durable"));
                    }
                    self.released_dead.insert(dead);
                    self.report.recoveries += 1;
                }
                self.server_outputs(out)?;
            }
            Event::ToClerk(to, message) => {
                if let Some(out) = self.with_core(to, |core, now| core.on_message(message, now)) {
                    self.clerk_outputs(to, out);
                }
            }
            Event::FenceDurable { epoch, incarnation } => {
                // Storage is fenced whatever became of the server that asked.
                self.storage.fenced.insert(epoch);
                if self.server_up && incarnation == self.server_incarnation {
                    let out = self.server.fence_durable(epoch, self.now);
                    self.server_outputs(out)?;
                }
            }
            Event::OperationStart(clerk) => {
                if self.now < self.config.operations_until {
                    self.start_operation(clerk);
                    let pause = self.rng.below(8_000) + 500;
                    self.schedule(pause, Event::OperationStart(clerk));
                }
                if self.faulty() && self.rng.chance(self.config.crash_probability) {
                    let victim = ClerkId(self.rng.below(self.config.clerks));
                    self.schedule(0, Event::Crash(victim));
                }
                if self.faulty() && self.rng.chance(self.config.server_crash_probability) {
                    self.schedule(0, Event::ServerCrash);
                }
            }
            Event::OperationEnd { clerk, incarnation, operation } => {
                if self.incarnation(clerk) == Some(incarnation)
                    && let Some(operation) =
                        self.workstations.get_mut(&clerk).expect("known").running.remove(&operation)
                {
                    for (lock, mode) in operation.locks {
                        if let Some(out) = self.with_core(clerk, |core, _| core.finish(lock, mode)) {
                            self.clerk_outputs(clerk, out);
                        }
                    }
                }
            }
            Event::FlushDone { clerk, incarnation, lock } => {
                if self.incarnation(clerk) == Some(incarnation)
                    && let Some(out) = self.with_core(clerk, |core, now| core.flush_done(lock, now))
                {
                    self.clerk_outputs(clerk, out);
                }
            }
            Event::RecoveryDone { clerk, incarnation, dead } => {
                if self.incarnation(clerk) == Some(incarnation)
                    && let Some(out) = self.with_core(clerk, |core, now| core.recovery_done(dead, now))
                {
                    self.clerk_outputs(clerk, out);
                }
            }
            Event::Write { lock, epoch, token } => {
                let newest = self.storage.newest_token.get(&lock).copied().unwrap_or_default();
                if self.storage.fenced.contains(&epoch) || token < newest {
                    self.report.writes_refused += 1;
                } else {
                    if self.released_dead.contains(&epoch) {
                        return Err(format!("a write of {epoch:?}, whose locks were released, was accepted"));
                    }
                    self.storage.newest_token.insert(lock, token);
                    self.report.writes_accepted += 1;
                }
            }
            Event::Crash(clerk) => {
                let workstation = self.workstations.get_mut(&clerk).expect("known clerk");
                if workstation.core.take().is_some() {
                    workstation.waiting.clear();
                    workstation.running.clear();
                    self.report.crashes += 1;
                    let downtime = self.rng.below(3 * self.config.server.lease_micros) + 1;
                    self.schedule(downtime, Event::Restart(clerk));
                }
            }
            Event::Restart(clerk) => self.start_clerk(clerk),
        }
        Ok(())
    }

    fn incarnation(&self, clerk: ClerkId) -> Option<u64> {
        let workstation = &self.workstations[&clerk];
        workstation.core.as_ref().map(|_| workstation.incarnation)
    }

    fn with_core<T>(&mut self, clerk: ClerkId, act: impl FnOnce(&mut ClerkCore, u64) -> T) -> Option<T> {
        let now = self.now;
        self.workstations.get_mut(&clerk).and_then(|workstation| workstation.core.as_mut()).map(|core| act(core, now))
    }

    /// A new operation on one lock, or (a third of the time) two.
    fn start_operation(&mut self, clerk: ClerkId) {
        let mut locks: BTreeMap<LockName, Mode> = BTreeMap::new();
        let count = if self.config.locks > 1 && self.rng.chance(0.33) { 2 } else { 1 };
        while locks.len() < count {
            let lock = LockName { table: 1, id: self.rng.below(self.config.locks) };
            let mode = if self.rng.chance(0.6) { Mode::Shared } else { Mode::Exclusive };
            locks.insert(lock, mode);
        }
        self.report.operations += 1;
        let operation =
            Operation { id: self.report.operations, locks: locks.into_iter().collect(), held: 0, started: self.now };
        self.advance(clerk, operation);
    }

    /// Takes the operation's next locks, in order; parks it on the first
    /// one that must wait, or runs it once it holds them all.
    fn advance(&mut self, clerk: ClerkId, mut operation: Operation) {
        while operation.held < operation.locks.len() {
            let (lock, mode) = operation.locks[operation.held];
            let Some((acquired, out)) = self.with_core(clerk, |core, now| core.acquire(lock, mode, now)) else {
                return;
            };
            let held = match acquired {
                Acquire::Held { token, epoch } => {
                    if mode == Mode::Exclusive {
                        // The operation writes under the lock; the write may
                        // be delayed past the lease.
                        self.transmit(Event::Write { lock, epoch, token });
                    }
                    true
                }
                Acquire::Wait => false,
            };
            self.clerk_outputs(clerk, out);
            if !held {
                self.workstations.get_mut(&clerk).expect("known").waiting.push(operation);
                return;
            }
            operation.held += 1;
        }
        let incarnation = self.incarnation(clerk).expect("running");
        let duration = self.rng.below(4_000) + 100;
        let id = operation.id;
        self.workstations.get_mut(&clerk).expect("known").running.insert(id, operation);
        self.schedule(duration, Event::OperationEnd { clerk, incarnation, operation: id });
    }

    fn clerk_outputs(&mut self, clerk: ClerkId, out: Vec<ClerkOutput>) {
        for output in out {
            match output {
                ClerkOutput::Send(message) => self.transmit(Event::ToServer(clerk, message)),
                ClerkOutput::LeaseReady { .. } => {}
                ClerkOutput::Granted { lock, .. } => {
                    self.report.grants += 1;
                    let waiting = std::mem::take(&mut self.workstations.get_mut(&clerk).expect("known").waiting);
                    let (ready, still): (Vec<Operation>, Vec<Operation>) =
                        waiting.into_iter().partition(|operation| operation.locks[operation.held].0 == lock);
                    self.workstations.get_mut(&clerk).expect("known").waiting.extend(still);
                    for operation in ready {
                        self.advance(clerk, operation);
                    }
                }
                ClerkOutput::Flush { lock, .. } => {
                    let incarnation = self.incarnation(clerk).expect("running");
                    let duration = self.rng.below(2_000) + 1;
                    self.schedule(duration, Event::FlushDone { clerk, incarnation, lock });
                }
                ClerkOutput::Recover { dead, .. } => {
                    let incarnation = self.incarnation(clerk).expect("running");
                    let duration = self.rng.below(5_000) + 1;
                    self.schedule(duration, Event::RecoveryDone { clerk, incarnation, dead });
                }
                ClerkOutput::LeaseLost => {
                    // Every operation fails: its locks are gone.
                    self.report.leases_lost += 1;
                    let workstation = self.workstations.get_mut(&clerk).expect("known");
                    workstation.waiting.clear();
                    workstation.running.clear();
                }
            }
        }
    }

    fn server_outputs(&mut self, out: Vec<ServerOutput>) -> Result<(), String> {
        for output in out {
            match output {
                ServerOutput::Send { to, message } => {
                    if let ToClerk::Grant { lock, token, .. } = message {
                        let granted = self.tokens_granted.entry(lock).or_default();
                        if !granted.contains(&token) && granted.last().is_some_and(|newest| *newest > token) {
                            return Err(format!(
                                "{lock}: new token {token:?} below {:?}, granted before",
                                granted.last()
                            ));
                        }
                        granted.insert(token);
                    }
                    self.transmit(Event::ToClerk(to, message));
                }
                ServerOutput::Fence { epoch } => {
                    // Written to a storage quorum: not lost, but it takes time.
                    let delay = self.rng.below(self.config.delay_max) + 1;
                    let incarnation = self.server_incarnation;
                    self.schedule(delay, Event::FenceDurable { epoch, incarnation });
                }
                // Saved at once: the driver saves before anything after it.
                ServerOutput::Persist(registry) => self.saved_registry = registry,
            }
        }
        if self.server.refused_reclaims > 0 {
            return Err(format!("at {} µs the server refused a reclaim: honest clerks never conflict", self.now));
        }
        self.server.check_invariants()
    }

    fn check_safety(&self) -> Result<(), String> {
        for id in 0..self.config.locks {
            let lock = LockName { table: 1, id };
            let holders: Vec<(ClerkId, Mode)> = self
                .workstations
                .iter()
                .filter_map(|(clerk, workstation)| {
                    workstation
                        .core
                        .as_ref()
                        .and_then(|core| core.holds(lock, self.now))
                        .map(|(mode, _)| (*clerk, mode))
                })
                .collect();
            for (index, (first, first_mode)) in holders.iter().enumerate() {
                for (second, second_mode) in &holders[index + 1..] {
                    if !first_mode.compatible(*second_mode) {
                        return Err(format!(
                            "at {} µs {lock}: {first:?} holds {first_mode:?} and {second:?} holds {second_mode:?}",
                            self.now
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The clerk counts exactly the operations that hold each lock.
    fn check_users(&self) -> Result<(), String> {
        for (clerk, workstation) in &self.workstations {
            let Some(core) = &workstation.core else { continue };
            let mut expected: BTreeMap<LockName, (u32, u32)> = BTreeMap::new();
            let holding = workstation
                .waiting
                .iter()
                .flat_map(|operation| &operation.locks[..operation.held])
                .chain(workstation.running.values().flat_map(|operation| &operation.locks));
            for (lock, mode) in holding {
                let entry = expected.entry(*lock).or_default();
                match mode {
                    Mode::Shared => entry.0 += 1,
                    Mode::Exclusive => entry.1 += 1,
                }
            }
            for id in 0..self.config.locks {
                let lock = LockName { table: 1, id };
                let counted = core.users(lock);
                let wanted = expected.get(&lock).copied().unwrap_or_default();
                if counted != wanted {
                    return Err(format!(
                        "at {} µs {clerk:?} counts {counted:?} users of {lock}, its operations hold {wanted:?}",
                        self.now
                    ));
                }
            }
        }
        Ok(())
    }

    /// Once the network is clean and every lease from the faulty period has
    /// had time to end, no operation waits longer than `max_wait`.
    fn check_progress(&self) -> Result<(), String> {
        let settled = self.config.faults_until + 3 * self.config.server.lease_micros;
        let Some(patience) = self.config.max_wait else { return Ok(()) };
        if self.now < settled {
            return Ok(());
        }
        for (clerk, workstation) in &self.workstations {
            if let Some(operation) =
                workstation.waiting.iter().find(|operation| self.now - operation.started.max(settled) > patience)
            {
                let (lock, _) = operation.locks[operation.held];
                return Err(format!(
                    "at {} µs {clerk:?}'s operation {operation:?} has waited over {patience} µs; server: {:?}; clerks: {}\nwaits:\n{}",
                    self.now,
                    self.server.holders(lock),
                    self.describe_clerks(lock),
                    self.wait_graph()
                ));
            }
        }
        Ok(())
    }

    /// Every running clerk's state of `lock`, and its operations' progress.
    fn describe_clerks(&self, lock: LockName) -> String {
        let clerks: Vec<String> = self
            .workstations
            .iter()
            .filter_map(|(id, workstation)| {
                workstation.core.as_ref().map(|core| {
                    let running: Vec<&Operation> = workstation.running.values().collect();
                    format!("{id:?}: {} running {running:?} waiting {:?}", core.describe(lock), workstation.waiting)
                })
            })
            .collect();
        clerks.join("; ")
    }

    /// Who waits for whom: every waiting operation, the lock it waits for,
    /// that lock's holders and queue at the server.
    fn wait_graph(&self) -> String {
        let mut lines = Vec::new();
        for (clerk, workstation) in &self.workstations {
            let Some(core) = &workstation.core else { continue };
            let epoch = core.lease(self.now);
            for operation in &workstation.waiting {
                let (lock, mode) = operation.locks[operation.held];
                lines.push(format!(
                    "{clerk:?} {epoch:?} op {} holds {:?} waits {lock} {mode:?}: server holders {:?} queue {:?}",
                    operation.id,
                    &operation.locks[..operation.held],
                    self.server.holders(lock),
                    self.server.queue(lock)
                ));
            }
        }
        lines.join("\n")
    }

    fn check_liveness(&self) -> Result<(), String> {
        for (clerk, workstation) in &self.workstations {
            if workstation.core.is_some()
                && let Some(operation) = workstation.waiting.first()
            {
                let (lock, mode) = &operation.locks[operation.held];
                return Err(format!(
                    "{clerk:?} still waits for {lock} ({mode:?}, and {} more) after the faults stopped; server: {:?}; clerks: {}",
                    workstation.waiting.len() - 1,
                    self.server.holders(*lock),
                    self.describe_clerks(*lock)
                ));
            }
        }
        if self.server.queued_requests() > 0 {
            return Err(format!("{} requests still queued at the server", self.server.queued_requests()));
        }
        if self.server.dead_sessions() > 0 {
            return Err(format!("{} dead leases never recovered", self.server.dead_sessions()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_seeds_keep_safety_fencing_and_liveness() {
        let config = SimConfig::default();
        let mut totals = SimReport::default();
        for seed in 0..1_000 {
            let report = run(seed, &config).unwrap_or_else(|error| panic!("seed {seed}: {error}"));
            totals.add(&report);
        }
        // The faults really happened.
        assert!(totals.crashes > 100, "{totals:?}");
        assert!(totals.recoveries > 50, "{totals:?}");
        assert!(totals.leases_lost > 20, "{totals:?}");
        assert!(totals.writes_refused > 0, "{totals:?}");
        assert!(totals.writes_accepted > 1_000 * 20, "{totals:?}");
    }

    #[test]
    fn heavy_faults_keep_safety_fencing_and_liveness() {
        let config = SimConfig::heavy_faults();
        for seed in 0..300 {
            run(seed, &config).unwrap_or_else(|error| panic!("heavy-faults seed {seed}: {error}"));
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        let config = SimConfig::default();
        let first = run(42, &config).expect("seed 42");
        assert_eq!(run(42, &config).expect("seed 42 again"), first);
        assert_ne!(run(43, &config).expect("seed 43").log_hash, first.log_hash);
    }
}
