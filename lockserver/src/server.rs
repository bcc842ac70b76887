//! The lock server as a pure state machine.
//!
//! [`LockServerCore`] does no I/O and reads no clock: the driver feeds it
//! clerk messages, fence completions and ticks (with the time in
//! microseconds) and carries out the [`ServerOutput`]s.
//!
//! ## Granting (F97 §5)
//! Each lock has holders and a FIFO queue of waiters. The head of the queue
//! is granted as soon as it is compatible with every other holder; waiters
//! behind a conflicting head wait even if they would be compatible, so an
//! exclusive request is never starved by a stream of shared ones. A head
//! that conflicts makes the server revoke every conflicting holder (down to
//! shared for a shared head, entirely for an exclusive one), once, then
//! again every `retransmit_micros` until it answers.
//!
//! ## Leases and a dead clerk, in this order
//! 1. At expiry the session stops counting: nothing more is granted to it,
//!    its queued requests are dropped, and messages under its epoch are
//!    answered with `LeaseLost`. Its locks stay held.
//! 2. The server asks for its epoch to be fenced in storage
//!    ([`ServerOutput::Fence`]) and waits for [`LockServerCore::fence_durable`].
//! 3. It asks a live clerk to replay the dead one's log (`Recover`). The
//!    recovery runs under the recoverer's own lease: if that lapses, another
//!    clerk is asked.
//! 4. Only when that clerk reports `RecoveryDone` are the dead session's
//!    locks released and their waiters served.
//!
//! A session that held no locks needs no recovery: it ends once fenced.
//!
//! ## Restart (a single server, F97 §6's first design, NFSv4's grace period)
//! The server keeps its [`ServerRegistry`] durable ([`ServerOutput::Persist`]
//! before the lease grant that needs it): the leases that may hold locks or
//! need recovery, the last epoch, and a generation. [`LockServerCore::restart`]
//! brings every registered lease back as live for one lease period, during
//! which its clerk reclaims the locks it holds (`ReclaimLocks`, `Reclaim`,
//! `ReclaimDone`). Nothing is granted while any registered lease's locks are
//! unknown: until each has reclaimed, or lapsed and been fenced and
//! recovered. Tokens of generation `g` start at `g << 40`, above every token
//! of earlier generations, so storage never sees a token go backwards.
//!
//! ## Invariants ([`LockServerCore::check_invariants`])
//! Holders of a lock are pairwise compatible; every holder belongs to a known
//! session that lists the lock; fencing tokens only grow (one sequence for
//! every lock); nothing
//! is granted while some lease's locks are unknown.

use crate::protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, Mode, ToClerk, ToServer};
use crate::registry::{RegisteredLease, ServerRegistry, TOKEN_GENERATION_SHIFT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Timing of a lock server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerConfig {
    /// A lease lasts this long after the server receives its opening or last renewal.
    pub lease_micros: u64,
    /// Unanswered revokes and recovery requests are sent again this often.
    pub retransmit_micros: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { lease_micros: 30_000_000, retransmit_micros: 500_000 }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerOutput {
    Send {
        to: ClerkId,
        message: ToClerk,
    },
    /// Make storage refuse every write carrying `epoch` (on a write quorum),
    /// then call [`LockServerCore::fence_durable`].
    Fence {
        epoch: LeaseEpoch,
    },
    /// Save the registry durably before carrying out any later output.
    Persist(ServerRegistry),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Live,
    /// Expired; the fence is being written.
    Expired,
    /// Fenced; its log is replayed by `recoverer` (asked at `asked_at`).
    Fenced {
        recoverer: Option<(LeaseEpoch, u64)>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Session {
    clerk: ClerkId,
    /// The opening attempt this lease answered (retransmitted openings get
    /// the same lease).
    attempt: u64,
    phase: Phase,
    expires_at: u64,
    held: BTreeSet<LockName>,
    waiting: BTreeSet<LockName>,
    /// Brought back by a restart, and its clerk has not yet listed the
    /// locks it holds.
    reclaiming: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Holder {
    epoch: LeaseEpoch,
    mode: Mode,
    token: FencingToken,
    /// The revoke sent to it, if any: what it must keep, and when it was sent.
    revoked: Option<(Option<Mode>, u64)>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Waiter {
    epoch: LeaseEpoch,
    mode: Mode,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LockState {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
}

/// How much a revoke asks: releasing entirely asks more than downgrading.
fn demand(keep: Option<Mode>) -> u8 {
    match keep {
        None => 2,
        Some(Mode::Shared) => 1,
        Some(Mode::Exclusive) => 0,
    }
}

/// The lock server's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct LockServerCore {
    config: ServerConfig,
    sessions: BTreeMap<LeaseEpoch, Session>,
    live_by_clerk: HashMap<ClerkId, LeaseEpoch>,
    /// The highest lease opening attempt seen from each clerk: a lower one
    /// is a delayed message from an earlier run and is ignored.
    highest_attempt: HashMap<ClerkId, u64>,
    last_epoch: u64,
    locks: BTreeMap<LockName, LockState>,
    /// Locks with a revoke outstanding, so that the timer repeats revokes
    /// without visiting every lock (entries go once nothing is revoked).
    revoking: BTreeSet<LockName>,
    generation: u64,
    /// The last fencing token issued, for any lock: tokens are one
    /// server-wide sequence, so a grant's token exceeds every token granted
    /// before it. A workstation stamps its writes with the highest token it
    /// holds, so whoever writes a block after a hand-off (of its lock, or of
    /// the bitmap portion that freed and reallocated it) stamps higher.
    last_token: u64,
    /// Sessions restored by a restart whose locks are not all known yet
    /// (still reclaiming, or lapsed and not yet recovered). Nothing is
    /// granted while there are any.
    unknown_holdings: usize,
    /// Reclaims refused because they conflicted with a known holder.
    pub refused_reclaims: u64,
}

impl LockServerCore {
    /// A server with nothing to recover (generation 0). Its registry is
    /// still reported for saving, so it can be restarted later.
    pub fn new(config: ServerConfig) -> Self {
        LockServerCore {
            config,
            sessions: BTreeMap::new(),
            live_by_clerk: HashMap::new(),
            highest_attempt: HashMap::new(),
            last_epoch: 0,
            locks: BTreeMap::new(),
            revoking: BTreeSet::new(),
            generation: 0,
            last_token: 0,
            unknown_holdings: 0,
            refused_reclaims: 0,
        }
    }

    /// A server starting from the registry its previous run saved, at
    /// `now`: the next generation, every registered lease live for one
    /// lease period of reclaiming. The first output saves the new generation.
    pub fn restart(config: ServerConfig, registry: ServerRegistry, now: u64) -> (Self, Vec<ServerOutput>) {
        let mut core = LockServerCore::new(config);
        core.generation = registry.generation + 1;
        core.last_epoch = registry.last_epoch;
        let mut out = Vec::new();
        for lease in registry.leases {
            // Its locks are unknown until it reclaims them, or until it is
            // fenced and recovered (an expired one at once).
            let phase = if lease.expired { Phase::Expired } else { Phase::Live };
            core.sessions.insert(
                lease.epoch,
                Session {
                    clerk: lease.clerk,
                    attempt: lease.attempt,
                    phase,
                    expires_at: now + config.lease_micros,
                    held: BTreeSet::new(),
                    waiting: BTreeSet::new(),
                    reclaiming: true,
                },
            );
            core.unknown_holdings += 1;
            let highest = core.highest_attempt.entry(lease.clerk).or_default();
            *highest = (*highest).max(lease.attempt);
            if lease.expired {
                out.push(ServerOutput::Fence { epoch: lease.epoch });
            } else {
                let newest = core.live_by_clerk.entry(lease.clerk).or_insert(lease.epoch);
                *newest = (*newest).max(lease.epoch);
            }
        }
        out.insert(0, ServerOutput::Persist(core.registry()));
        (core, out)
    }

    /// What must be durable: every session's lease, the last epoch, the generation.
    pub fn registry(&self) -> ServerRegistry {
        ServerRegistry {
            generation: self.generation,
            last_epoch: self.last_epoch,
            leases: self
                .sessions
                .iter()
                .map(|(epoch, session)| RegisteredLease {
                    epoch: *epoch,
                    clerk: session.clerk,
                    attempt: session.attempt,
                    expired: session.phase != Phase::Live,
                })
                .collect(),
        }
    }

    /// The lowest fencing token this generation grants.
    fn first_token(&self) -> u64 {
        self.generation << TOKEN_GENERATION_SHIFT
    }

    /// Whether grants wait for restored sessions' locks to become known.
    pub fn reclaiming(&self) -> bool {
        self.unknown_holdings > 0
    }

    /// Asks a restored session that has not reported all its locks for them.
    fn prompt_reclaim(&self, epoch: LeaseEpoch, out: &mut Vec<ServerOutput>) {
        if let Some(session) = self.sessions.get(&epoch)
            && session.phase == Phase::Live
            && session.reclaiming
        {
            let message = ToClerk::ReclaimLocks { epoch, first_token: FencingToken(self.first_token()) };
            out.push(ServerOutput::Send { to: session.clerk, message });
        }
    }

    /// One fewer session with unknown locks; at zero, grants resume.
    fn holdings_known(&mut self, now: u64, out: &mut Vec<ServerOutput>) {
        self.unknown_holdings -= 1;
        if self.unknown_holdings == 0 {
            let waiting: Vec<LockName> =
                self.locks.iter().filter(|(_, state)| !state.queue.is_empty()).map(|(lock, _)| *lock).collect();
            for lock in waiting {
                self.serve(lock, now, out);
            }
        }
    }

    fn is_live(&self, epoch: LeaseEpoch) -> bool {
        self.sessions.get(&epoch).is_some_and(|session| session.phase == Phase::Live)
    }

    /// The live session `epoch` of clerk `from`, if it is one.
    fn live_session(&self, from: ClerkId, epoch: LeaseEpoch) -> bool {
        self.sessions.get(&epoch).is_some_and(|session| session.phase == Phase::Live && session.clerk == from)
    }

    /// A message from clerk `from`.
    pub fn handle(&mut self, from: ClerkId, message: ToServer, now: u64) -> Vec<ServerOutput> {
        let mut out = Vec::new();
        match message {
            ToServer::OpenLease { clerk, attempt } if clerk == from => self.open_lease(clerk, attempt, now, &mut out),
            ToServer::OpenLease { .. } => {}
            ToServer::RenewLease { epoch, sequence } => {
                let message = if self.live_session(from, epoch) {
                    let session = self.sessions.get_mut(&epoch).expect("live");
                    session.expires_at = now + self.config.lease_micros;
                    ToClerk::LeaseRenewed { epoch, sequence }
                } else {
                    ToClerk::LeaseLost { epoch }
                };
                out.push(ServerOutput::Send { to: from, message });
                self.prompt_reclaim(epoch, &mut out);
            }
            ToServer::Request { epoch, lock, mode } => {
                if self.live_session(from, epoch) {
                    self.prompt_reclaim(epoch, &mut out);
                    self.request(epoch, lock, mode, now, &mut out);
                } else {
                    out.push(ServerOutput::Send { to: from, message: ToClerk::LeaseLost { epoch } });
                }
            }
            ToServer::Release { epoch, lock, token, keep } => {
                // A lapsed session's release is not trusted: its last writes
                // may have been fenced, so its locks wait for recovery.
                if self.live_session(from, epoch) {
                    self.release(epoch, lock, token, keep, now, &mut out);
                } else {
                    out.push(ServerOutput::Send { to: from, message: ToClerk::LeaseLost { epoch } });
                }
            }
            ToServer::RecoveryDone { epoch, dead } => {
                if self.live_session(from, epoch) {
                    self.recovery_done(epoch, dead, now, &mut out);
                }
            }
            ToServer::Reclaim { epoch, first_token, holdings } => {
                // A list for another run of the server may be stale.
                if self.live_session(from, epoch) && first_token.0 == self.first_token() {
                    self.reclaim(epoch, holdings, now, &mut out);
                }
            }
        }
        out
    }

    /// A restored session lists every lock it holds: they become its
    /// holdings, and its locks are known. A list an honest clerk never sends
    /// (a lock that conflicts with a holder already known, a lock listed
    /// twice, a token of this run or later) is not taken: the session is
    /// ended instead, and so fenced and recovered, which is safe whatever
    /// it held.
    fn reclaim(
        &mut self,
        epoch: LeaseEpoch,
        holdings: Vec<(LockName, Mode, FencingToken)>,
        now: u64,
        out: &mut Vec<ServerOutput>,
    ) {
        if !self.sessions[&epoch].reclaiming {
            return; // taken already: this is a repeat, or an older list arriving late
        }
        let first_token = self.first_token();
        let conflict = holdings.iter().any(|(lock, mode, token)| {
            token.0 >= first_token
                || self.locks.get(lock).is_some_and(|state| {
                    state.holders.iter().any(|holder| holder.epoch != epoch && !holder.mode.compatible(*mode))
                })
        });
        let distinct: BTreeSet<LockName> = holdings.iter().map(|(lock, _, _)| *lock).collect();
        if conflict || distinct.len() != holdings.len() {
            self.refused_reclaims += 1;
            self.expire(epoch, now, out);
            return;
        }
        let session = self.sessions.get_mut(&epoch).expect("live");
        session.reclaiming = false;
        for (lock, mode, token) in holdings {
            let state = self.locks.entry(lock).or_default();
            state.holders.push(Holder { epoch, mode, token, revoked: None });
            self.last_token = self.last_token.max(token.0);
            session.held.insert(lock);
        }
        self.holdings_known(now, out);
    }

    fn open_lease(&mut self, clerk: ClerkId, attempt: u64, now: u64, out: &mut Vec<ServerOutput>) {
        let highest = self.highest_attempt.entry(clerk).or_default();
        if attempt < *highest {
            return; // a delayed opening from an earlier run or lease
        }
        *highest = attempt;
        if let Some(&epoch) = self.live_by_clerk.get(&clerk) {
            let session = self.sessions.get_mut(&epoch).expect("live sessions are known");
            if session.attempt == attempt {
                // A retransmitted opening: the same lease again.
                session.expires_at = now + self.config.lease_micros;
                let message = ToClerk::LeaseGranted { attempt, epoch, duration_micros: self.config.lease_micros };
                out.push(ServerOutput::Send { to: clerk, message });
                self.prompt_reclaim(epoch, out);
                return;
            }
            // The clerk restarted and lost its cache: its old lease ends now.
            self.expire(epoch, now, out);
        }
        self.last_epoch += 1;
        let epoch = LeaseEpoch(self.last_epoch);
        self.sessions.insert(
            epoch,
            Session {
                clerk,
                attempt,
                phase: Phase::Live,
                expires_at: now + self.config.lease_micros,
                held: BTreeSet::new(),
                waiting: BTreeSet::new(),
                reclaiming: false,
            },
        );
        self.live_by_clerk.insert(clerk, epoch);
        // The lease must survive a restart before the clerk may use it.
        out.push(ServerOutput::Persist(self.registry()));
        let message = ToClerk::LeaseGranted { attempt, epoch, duration_micros: self.config.lease_micros };
        out.push(ServerOutput::Send { to: clerk, message });
        self.assign_recoveries(now, out);
    }

    fn request(&mut self, epoch: LeaseEpoch, lock: LockName, mode: Mode, now: u64, out: &mut Vec<ServerOutput>) {
        let clerk = self.sessions[&epoch].clerk;
        let state = self.locks.entry(lock).or_default();
        if let Some(holder) = state.holders.iter().find(|holder| holder.epoch == epoch)
            && holder.mode.covers(mode)
            && holder.revoked.is_none()
        {
            // Held already: the grant was lost, or this is a duplicate.
            let message = ToClerk::Grant { epoch, lock, mode: holder.mode, token: holder.token };
            out.push(ServerOutput::Send { to: clerk, message });
            return;
        }
        // A holder being revoked that asks again is giving the lock up (its
        // release may still be on the way) and wants it back afterwards: it
        // queues like everyone else.

        match state.queue.iter_mut().find(|waiter| waiter.epoch == epoch) {
            Some(waiter) => waiter.mode = waiter.mode.max(mode),
            None => state.queue.push_back(Waiter { epoch, mode }),
        }
        self.sessions.get_mut(&epoch).expect("live").waiting.insert(lock);
        self.serve(lock, now, out);
    }

    fn release(
        &mut self,
        epoch: LeaseEpoch,
        lock: LockName,
        token: FencingToken,
        keep: Option<Mode>,
        now: u64,
        out: &mut Vec<ServerOutput>,
    ) {
        let Some(state) = self.locks.get_mut(&lock) else { return };
        let Some(index) = state.holders.iter().position(|holder| holder.epoch == epoch && holder.token == token) else {
            return; // stale: a release of an older grant
        };
        match keep {
            None => {
                state.holders.swap_remove(index);
                self.sessions.get_mut(&epoch).expect("live").held.remove(&lock);
            }
            Some(Mode::Shared) => {
                let holder = &mut state.holders[index];
                holder.mode = Mode::Shared;
                holder.revoked = None;
            }
            Some(Mode::Exclusive) => return,
        }
        self.serve(lock, now, out);
    }

    /// Grants from the head of `lock`'s queue while it is compatible; else
    /// revokes what conflicts with the head.
    fn serve(&mut self, lock: LockName, now: u64, out: &mut Vec<ServerOutput>) {
        if self.reclaiming() {
            return; // some restored lease may hold this lock: wait to know
        }
        let first_token = self.first_token();
        loop {
            let state = self.locks.get_mut(&lock).expect("served locks exist");
            let Some(head) = state.queue.front().copied() else { break };
            let head_live = self.sessions.get(&head.epoch).is_some_and(|session| session.phase == Phase::Live);
            if !head_live {
                state.queue.pop_front();
                continue;
            }
            if state
                .holders
                .iter()
                .any(|holder| holder.epoch == head.epoch && holder.revoked.is_some() && holder.mode.covers(head.mode))
            {
                // The head is a holder asking again while it gives the lock
                // up: granting now would change its hold behind its back.
                // Its release comes first.
                break;
            }
            if let Some(holder) = state
                .holders
                .iter()
                .find(|holder| holder.epoch == head.epoch && holder.revoked.is_none() && holder.mode.covers(head.mode))
            {
                // Asked while nothing could be granted (a restart's grace
                // period), and held since in a mode that covers it: the hold
                // stays as it is (granting the weaker mode would downgrade
                // it behind the clerk's back).
                let message = ToClerk::Grant { epoch: head.epoch, lock, mode: holder.mode, token: holder.token };
                state.queue.pop_front();
                let session = self.sessions.get_mut(&head.epoch).expect("live");
                session.waiting.remove(&lock);
                out.push(ServerOutput::Send { to: session.clerk, message });
                continue;
            }
            let conflicting =
                state.holders.iter().any(|holder| holder.epoch != head.epoch && !holder.mode.compatible(head.mode));
            if !conflicting {
                state.queue.pop_front();
                // Tokens of a run stay below the next run's first token.
                self.last_token = self.last_token.max(first_token) + 1;
                assert!(self.last_token < first_token + (1 << TOKEN_GENERATION_SHIFT), "a run's tokens ran out");
                let token = FencingToken(self.last_token);
                match state.holders.iter_mut().find(|holder| holder.epoch == head.epoch) {
                    Some(holder) => {
                        holder.mode = head.mode;
                        holder.token = token;
                        holder.revoked = None;
                    }
                    None => {
                        if state.holders.capacity() == 0 {
                            // Most locks have one holder: no room for four.
                            state.holders.reserve_exact(1);
                        }
                        state.holders.push(Holder { epoch: head.epoch, mode: head.mode, token, revoked: None })
                    }
                }
                let session = self.sessions.get_mut(&head.epoch).expect("live");
                session.held.insert(lock);
                session.waiting.remove(&lock);
                let message = ToClerk::Grant { epoch: head.epoch, lock, mode: head.mode, token };
                out.push(ServerOutput::Send { to: session.clerk, message });
                continue;
            }
            let keep = (head.mode == Mode::Shared).then_some(Mode::Shared);
            let mut revokes = Vec::new();
            for holder in state.holders.iter_mut() {
                if holder.epoch == head.epoch || holder.mode.compatible(head.mode) {
                    continue;
                }
                if holder.revoked.is_some_and(|(sent, _)| demand(sent) >= demand(keep)) {
                    continue;
                }
                holder.revoked = Some((keep, now));
                revokes.push(*holder);
            }
            if !revokes.is_empty() {
                self.revoking.insert(lock);
            }
            for holder in revokes {
                self.send_revoke(lock, &holder, keep, out);
            }
            break;
        }
    }

    fn send_revoke(&self, lock: LockName, holder: &Holder, keep: Option<Mode>, out: &mut Vec<ServerOutput>) {
        // A dead session's locks wait for recovery; nobody to ask.
        if let Some(session) = self.sessions.get(&holder.epoch)
            && session.phase == Phase::Live
        {
            let message = ToClerk::Revoke { epoch: holder.epoch, lock, token: holder.token, held: holder.mode, keep };
            out.push(ServerOutput::Send { to: session.clerk, message });
        }
    }

    /// Ends a live session: step 1 of the dead-clerk sequence, then asks
    /// for the fence (step 2). Requests queued behind its own may proceed.
    fn expire(&mut self, epoch: LeaseEpoch, now: u64, out: &mut Vec<ServerOutput>) {
        let Some(session) = self.sessions.get_mut(&epoch) else { return };
        if session.phase != Phase::Live {
            return;
        }
        session.phase = Phase::Expired;
        if self.live_by_clerk.get(&session.clerk) == Some(&epoch) {
            self.live_by_clerk.remove(&session.clerk);
        }
        let waiting: Vec<LockName> = std::mem::take(&mut session.waiting).into_iter().collect();
        // A restart must fence and recover it, not wait for its reclaim.
        out.push(ServerOutput::Persist(self.registry()));
        out.push(ServerOutput::Fence { epoch });
        for lock in waiting {
            if let Some(state) = self.locks.get_mut(&lock) {
                state.queue.retain(|waiter| waiter.epoch != epoch);
            }
            self.serve(lock, now, out);
        }
    }

    /// The fence for `epoch` is durable in storage: recovery may start.
    pub fn fence_durable(&mut self, epoch: LeaseEpoch, now: u64) -> Vec<ServerOutput> {
        let mut out = Vec::new();
        let Some(session) = self.sessions.get_mut(&epoch) else { return out };
        if session.phase != Phase::Expired {
            return out;
        }
        if session.held.is_empty() && !session.reclaiming {
            // Nothing held: nothing unflushed to replay.
            self.sessions.remove(&epoch);
            out.push(ServerOutput::Persist(self.registry()));
        } else {
            session.phase = Phase::Fenced { recoverer: None };
            self.assign_recoveries(now, &mut out);
        }
        out
    }

    /// Asks a live clerk to replay every fenced session that has nobody on it.
    fn assign_recoveries(&mut self, now: u64, out: &mut Vec<ServerOutput>) {
        let Some((&recoverer, recoverer_clerk)) = self
            .sessions
            .iter()
            .find(|(_, session)| session.phase == Phase::Live)
            .map(|(epoch, session)| (epoch, session.clerk))
        else {
            return; // nobody alive: the first clerk to open a lease is asked
        };
        let unassigned: Vec<LeaseEpoch> = self
            .sessions
            .iter()
            .filter(|(_, session)| match session.phase {
                Phase::Fenced { recoverer: None } => true,
                Phase::Fenced { recoverer: Some((epoch, _)) } => !self.is_live(epoch),
                _ => false,
            })
            .map(|(epoch, _)| *epoch)
            .collect();
        for dead in unassigned {
            let session = self.sessions.get_mut(&dead).expect("listed");
            session.phase = Phase::Fenced { recoverer: Some((recoverer, now)) };
            let message = ToClerk::Recover { epoch: recoverer, dead, dead_clerk: session.clerk };
            out.push(ServerOutput::Send { to: recoverer_clerk, message });
        }
    }

    fn recovery_done(&mut self, recoverer: LeaseEpoch, dead: LeaseEpoch, now: u64, out: &mut Vec<ServerOutput>) {
        let assigned = self.sessions.get(&dead).is_some_and(
            |session| matches!(session.phase, Phase::Fenced { recoverer: Some((epoch, _)) } if epoch == recoverer),
        );
        if !assigned {
            return;
        }
        let session = self.sessions.remove(&dead).expect("checked");
        out.push(ServerOutput::Persist(self.registry()));
        if session.reclaiming {
            self.holdings_known(now, out);
        }
        for lock in session.held {
            if let Some(state) = self.locks.get_mut(&lock) {
                state.holders.retain(|holder| holder.epoch != dead);
            }
            self.serve(lock, now, out);
        }
    }

    /// Expires lapsed leases, repeats unanswered revokes and recovery
    /// requests, and reassigns recoveries whose recoverer died.
    pub fn tick(&mut self, now: u64) -> Vec<ServerOutput> {
        let mut out = Vec::new();
        let lapsed: Vec<LeaseEpoch> = self
            .sessions
            .iter()
            .filter(|(_, session)| session.phase == Phase::Live && session.expires_at <= now)
            .map(|(epoch, _)| *epoch)
            .collect();
        for epoch in lapsed {
            self.expire(epoch, now, &mut out);
        }
        let retransmit = self.config.retransmit_micros;
        let mut revokes = Vec::new();
        let locks = &mut self.locks;
        self.revoking.retain(|lock| {
            let Some(state) = locks.get_mut(lock) else { return false };
            let mut outstanding = false;
            for holder in state.holders.iter_mut() {
                if let Some((keep, sent)) = holder.revoked {
                    outstanding = true;
                    if now.saturating_sub(sent) >= retransmit {
                        holder.revoked = Some((keep, now));
                        revokes.push((*lock, *holder, keep));
                    }
                }
            }
            outstanding
        });
        for (lock, holder, keep) in revokes {
            self.send_revoke(lock, &holder, keep, &mut out);
        }
        let mut resend = Vec::new();
        for (dead, session) in self.sessions.iter_mut() {
            if let Phase::Fenced { recoverer: Some((recoverer, asked)) } = session.phase
                && now.saturating_sub(asked) >= retransmit
            {
                session.phase = Phase::Fenced { recoverer: Some((recoverer, now)) };
                resend.push((recoverer, *dead, session.clerk));
            }
        }
        for (recoverer, dead, dead_clerk) in resend {
            if let Some(session) = self.sessions.get(&recoverer)
                && session.phase == Phase::Live
            {
                let message = ToClerk::Recover { epoch: recoverer, dead, dead_clerk };
                out.push(ServerOutput::Send { to: session.clerk, message });
            }
        }
        self.assign_recoveries(now, &mut out);
        out
    }

    /// Leases that expired and whose fence has not been reported durable:
    /// a new leader of the replicated service asks for them again.
    pub fn fences_pending(&self) -> Vec<LeaseEpoch> {
        self.sessions.iter().filter(|(_, session)| session.phase == Phase::Expired).map(|(epoch, _)| *epoch).collect()
    }

    /// Holders of `lock`: (epoch, mode, token).
    pub fn holders(&self, lock: LockName) -> Vec<(LeaseEpoch, Mode, FencingToken)> {
        self.locks
            .get(&lock)
            .map(|state| state.holders.iter().map(|holder| (holder.epoch, holder.mode, holder.token)).collect())
            .unwrap_or_default()
    }

    /// Requests queued for `lock`, in order: (epoch, mode).
    pub fn queue(&self, lock: LockName) -> Vec<(LeaseEpoch, Mode)> {
        self.locks
            .get(&lock)
            .map(|state| state.queue.iter().map(|waiter| (waiter.epoch, waiter.mode)).collect())
            .unwrap_or_default()
    }

    /// The live lease of `clerk`, if any.
    pub fn live_lease(&self, clerk: ClerkId) -> Option<LeaseEpoch> {
        self.live_by_clerk.get(&clerk).copied()
    }

    /// Sessions that ended but whose locks are not released yet.
    pub fn dead_sessions(&self) -> usize {
        self.sessions.values().filter(|session| session.phase != Phase::Live).count()
    }

    /// Requests waiting in any queue.
    pub fn queued_requests(&self) -> usize {
        self.locks.values().map(|state| state.queue.len()).sum()
    }

    /// Checks the server's invariants; the first broken one as an error.
    pub fn check_invariants(&self) -> Result<(), String> {
        let reclaiming = self.sessions.values().filter(|session| session.reclaiming).count();
        if reclaiming != self.unknown_holdings {
            return Err(format!("{reclaiming} sessions reclaim, but {} are counted", self.unknown_holdings));
        }
        for (lock, state) in &self.locks {
            for (index, first) in state.holders.iter().enumerate() {
                for second in &state.holders[index + 1..] {
                    if first.epoch == second.epoch || !first.mode.compatible(second.mode) {
                        return Err(format!("{lock}: holders {first:?} and {second:?} conflict"));
                    }
                }
                let Some(session) = self.sessions.get(&first.epoch) else {
                    return Err(format!("{lock}: holder {:?} has no session", first.epoch));
                };
                if !session.held.contains(lock) {
                    return Err(format!("{lock}: session {:?} does not list it", first.epoch));
                }
                if first.token.0 > self.last_token {
                    return Err(format!("{lock}: token {:?} above the last issued", first.token));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: LockName = LockName { table: 1, id: 7 };
    const LEASE: u64 = 1_000_000;

    fn server() -> LockServerCore {
        LockServerCore::new(ServerConfig { lease_micros: LEASE, retransmit_micros: 100_000 })
    }

    fn open(server: &mut LockServerCore, clerk: u64, now: u64) -> LeaseEpoch {
        let out = server.handle(ClerkId(clerk), ToServer::OpenLease { clerk: ClerkId(clerk), attempt: 1 }, now);
        match &out[..] {
            [
                ServerOutput::Persist(registry),
                ServerOutput::Send { message: ToClerk::LeaseGranted { epoch, .. }, .. },
                ..,
            ] => {
                assert!(registry.leases.iter().any(|lease| lease.epoch == *epoch), "saved before it is granted");
                *epoch
            }
            other => panic!("{other:?}"),
        }
    }

    fn request(server: &mut LockServerCore, clerk: u64, epoch: LeaseEpoch, mode: Mode) -> Vec<ServerOutput> {
        server.handle(ClerkId(clerk), ToServer::Request { epoch, lock: LOCK, mode }, 0)
    }

    fn grants(out: &[ServerOutput]) -> Vec<(ClerkId, Mode, FencingToken)> {
        out.iter()
            .filter_map(|output| match output {
                ServerOutput::Send { to, message: ToClerk::Grant { mode, token, .. } } => Some((*to, *mode, *token)),
                _ => None,
            })
            .collect()
    }

    fn revokes(out: &[ServerOutput]) -> Vec<(ClerkId, Option<Mode>)> {
        out.iter()
            .filter_map(|output| match output {
                ServerOutput::Send { to, message: ToClerk::Revoke { keep, .. } } => Some((*to, *keep)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn shared_holders_coexist_and_an_exclusive_request_revokes_them_all() {
        let mut server = server();
        let (a, b, c) = (open(&mut server, 1, 0), open(&mut server, 2, 0), open(&mut server, 3, 0));
        assert_eq!(
            grants(&request(&mut server, 1, a, Mode::Shared)),
            vec![(ClerkId(1), Mode::Shared, FencingToken(1))]
        );
        assert_eq!(
            grants(&request(&mut server, 2, b, Mode::Shared)),
            vec![(ClerkId(2), Mode::Shared, FencingToken(2))]
        );
        let out = request(&mut server, 3, c, Mode::Exclusive);
        assert!(grants(&out).is_empty());
        assert_eq!(revokes(&out), vec![(ClerkId(1), None), (ClerkId(2), None)]);
        let out = server.handle(
            ClerkId(1),
            ToServer::Release { epoch: a, lock: LOCK, token: FencingToken(1), keep: None },
            0,
        );
        assert!(grants(&out).is_empty(), "clerk 2 still holds it");
        let out = server.handle(
            ClerkId(2),
            ToServer::Release { epoch: b, lock: LOCK, token: FencingToken(2), keep: None },
            0,
        );
        assert_eq!(grants(&out), vec![(ClerkId(3), Mode::Exclusive, FencingToken(3))]);
        server.check_invariants().unwrap();
    }

    #[test]
    fn a_waiting_exclusive_request_is_not_starved_by_later_shared_ones() {
        let mut server = server();
        let (a, b, c) = (open(&mut server, 1, 0), open(&mut server, 2, 0), open(&mut server, 3, 0));
        request(&mut server, 1, a, Mode::Shared);
        request(&mut server, 2, b, Mode::Exclusive);
        let out = request(&mut server, 3, c, Mode::Shared);
        assert!(
            grants(&out).is_empty(),
            "shared would be compatible with the holder, but an exclusive request is ahead"
        );
        let out = server.handle(
            ClerkId(1),
            ToServer::Release { epoch: a, lock: LOCK, token: FencingToken(1), keep: None },
            0,
        );
        assert_eq!(grants(&out), vec![(ClerkId(2), Mode::Exclusive, FencingToken(2))]);
        assert_eq!(revokes(&out), vec![(ClerkId(2), Some(Mode::Shared))], "the shared waiter asks for a downgrade");
        let out = server.handle(
            ClerkId(2),
            ToServer::Release { epoch: b, lock: LOCK, token: FencingToken(2), keep: Some(Mode::Shared) },
            0,
        );
        assert_eq!(grants(&out), vec![(ClerkId(3), Mode::Shared, FencingToken(3))]);
        assert_eq!(server.holders(LOCK).len(), 2);
    }

    #[test]
    fn stale_releases_and_duplicate_requests_change_nothing() {
        let mut server = server();
        let a = open(&mut server, 1, 0);
        request(&mut server, 1, a, Mode::Exclusive);
        let again = request(&mut server, 1, a, Mode::Shared);
        assert_eq!(grants(&again), vec![(ClerkId(1), Mode::Exclusive, FencingToken(1))], "the grant is repeated");
        let out = server.handle(
            ClerkId(1),
            ToServer::Release { epoch: a, lock: LOCK, token: FencingToken(9), keep: None },
            0,
        );
        assert!(out.is_empty());
        assert_eq!(server.holders(LOCK), vec![(a, Mode::Exclusive, FencingToken(1))]);
    }

    #[test]
    fn a_dead_clerk_is_fenced_then_recovered_and_only_then_released() {
        let mut server = server();
        let (a, b) = (open(&mut server, 1, 0), open(&mut server, 2, 0));
        request(&mut server, 1, a, Mode::Exclusive);
        request(&mut server, 2, b, Mode::Exclusive);
        // Clerk 2 renews; clerk 1 goes silent.
        server.handle(ClerkId(2), ToServer::RenewLease { epoch: b, sequence: 1 }, LEASE / 2);
        let out = server.tick(LEASE);
        assert_eq!(
            out,
            vec![ServerOutput::Persist(server.registry()), ServerOutput::Fence { epoch: a }],
            "(a) stop granting, saved as expired, (b) fence first"
        );
        assert!(server.registry().leases.iter().any(|lease| lease.epoch == a && lease.expired));
        assert!(grants(&server.tick(LEASE + 1)).is_empty(), "nothing is released before recovery");
        let out = server.handle(ClerkId(1), ToServer::Request { epoch: a, lock: LOCK, mode: Mode::Shared }, LEASE + 2);
        assert_eq!(out, vec![ServerOutput::Send { to: ClerkId(1), message: ToClerk::LeaseLost { epoch: a } }]);
        let out = server.fence_durable(a, LEASE + 3);
        assert_eq!(
            out,
            vec![ServerOutput::Send {
                to: ClerkId(2),
                message: ToClerk::Recover { epoch: b, dead: a, dead_clerk: ClerkId(1) }
            }],
            "(c) a live clerk replays the log"
        );
        let out = server.handle(ClerkId(2), ToServer::RecoveryDone { epoch: b, dead: a }, LEASE + 4);
        assert_eq!(grants(&out), vec![(ClerkId(2), Mode::Exclusive, FencingToken(2))], "(d) then the lock moves");
        assert_eq!(server.dead_sessions(), 0);
        server.check_invariants().unwrap();
    }

    /// A restart from the registry: a live lease waits for its reclaim, an
    /// expired one is fenced again at once, and nothing is granted until
    /// both are settled; a reclaim an honest clerk never sends ends its lease.
    #[test]
    fn a_restart_settles_every_registered_lease_before_granting() {
        let mut server = server();
        let (a, b) = (open(&mut server, 1, 0), open(&mut server, 2, 0));
        request(&mut server, 1, a, Mode::Exclusive);
        server.handle(ClerkId(1), ToServer::RenewLease { epoch: a, sequence: 1 }, LEASE / 2);
        server.tick(LEASE); // b lapses
        let (mut restarted, out) = LockServerCore::restart(server.config, server.registry(), 0);
        assert!(matches!(out[0], ServerOutput::Persist(_)), "the new generation is saved first");
        assert!(out.contains(&ServerOutput::Fence { epoch: b }), "the expired lease is fenced again");
        let c = open(&mut restarted, 3, 1);
        let out = request(&mut restarted, 3, c, Mode::Exclusive);
        assert!(grants(&out).is_empty(), "nothing is granted while a's locks are unknown");
        let first_token = FencingToken(1 << TOKEN_GENERATION_SHIFT);
        // A list with a token of the new run is not honest: a's lease ends.
        let bad = ToServer::Reclaim { epoch: a, first_token, holdings: vec![(LOCK, Mode::Exclusive, first_token)] };
        let out = restarted.handle(ClerkId(1), bad, 2);
        assert!(out.contains(&ServerOutput::Fence { epoch: a }));
        assert_eq!(restarted.refused_reclaims, 1);
        for dead in [a, b] {
            restarted.fence_durable(dead, 3);
            restarted.handle(ClerkId(3), ToServer::RecoveryDone { epoch: c, dead }, 4);
        }
        assert!(!restarted.reclaiming());
        assert_eq!(restarted.holders(LOCK), vec![(c, Mode::Exclusive, FencingToken(first_token.0 + 1))]);
        restarted.check_invariants().unwrap();
    }

    #[test]
    fn a_restarted_clerk_gets_a_new_epoch_and_its_old_lease_is_fenced() {
        let mut server = server();
        let first = open(&mut server, 1, 0);
        request(&mut server, 1, first, Mode::Exclusive);
        let out = server.handle(ClerkId(1), ToServer::OpenLease { clerk: ClerkId(1), attempt: 2 }, 10);
        assert!(out.contains(&ServerOutput::Fence { epoch: first }));
        let second = server.live_lease(ClerkId(1)).expect("a new lease");
        assert!(second > first);
        let out = server.fence_durable(first, 20);
        assert!(out.iter().any(|output| matches!(
            output,
            ServerOutput::Send { message: ToClerk::Recover { dead, .. }, .. } if *dead == first
        )));
    }
}
