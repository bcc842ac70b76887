//! The clerk: a workstation's side of the lock service, as a pure state machine.
//!
//! [`ClerkCore`] caches locks (they are sticky: an idle lock stays held
//! until the server revokes it), counts the workstation's operations using
//! each lock, and turns a revoke into a [`ClerkOutput::Flush`] once no
//! operation needs the lock any more. The workstation flushes its log, then
//! the dirty data the lock covers, and calls [`ClerkCore::flush_done`]; only
//! then is the release sent (F97 §5).
//!
//! ## The lease, seen from the clerk
//! The clerk counts its lease from when it *sent* the opening or renewal
//! the server answered, minus a margin, so it always ends before the
//! server's (which counts from when it received it). Past that point the
//! clerk holds nothing: it drops every lock, reports
//! [`ClerkOutput::LeaseLost`] (the workstation drops its cache and fails
//! calls that needed dirty data), and opens a new lease.
//!
//! ## A restarted server
//! A server that restarted knows the lease but not its locks, and asks for
//! them (`ReclaimLocks`): the clerk answers with a `Reclaim` listing every
//! lock it holds. From then on, a grant
//! below the restarted server's first token is a delayed one from before
//! the restart, and is ignored.
//!
//! ## Stale messages
//! Grants carry a fencing token that grows with every grant of a lock: a
//! grant not newer than the newest one seen is a duplicate or arrived out of
//! order, and is ignored. Revokes name the token of the hold they revoke.

use crate::protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, Mode, ToClerk, ToServer};
use crate::wire::RECLAIM_LOCKS_MAX;
use std::collections::{BTreeMap, BTreeSet};

/// Timing of a clerk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClerkConfig {
    /// Subtracted from every lease: covers clock drift between clerk and server.
    pub lease_margin_micros: u64,
    /// A renewal is sent this often.
    pub renew_every_micros: u64,
    /// Unanswered openings and requests are sent again this often.
    pub retransmit_micros: u64,
}

impl Default for ClerkConfig {
    /// For the default 30 s lease: renew every 5 s, 2 s margin.
    fn default() -> Self {
        ClerkConfig { lease_margin_micros: 2_000_000, renew_every_micros: 5_000_000, retransmit_micros: 500_000 }
    }
}

/// What the workstation (or the driver) must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClerkOutput {
    Send(ToServer),
    /// The lease `epoch` is held: stamp it on every write to shared storage.
    LeaseReady {
        epoch: LeaseEpoch,
    },
    /// `lock` is held in `mode` under `token`: operations waiting for it may retry.
    Granted {
        lock: LockName,
        mode: Mode,
        token: FencingToken,
    },
    /// Flush the log, then the dirty data `lock` covers, then call
    /// [`ClerkCore::flush_done`]. Afterwards the lock is held only in `keep`
    /// (`None`: not at all): cached data it no longer covers must be dropped.
    Flush {
        lock: LockName,
        keep: Option<Mode>,
    },
    /// Replay the log of lease `dead` (its epoch is fenced in storage), then
    /// call [`ClerkCore::recovery_done`].
    Recover {
        dead: LeaseEpoch,
        dead_clerk: ClerkId,
    },
    /// The lease ran out: no lock is held any more, the cache must go, and
    /// operations in flight fail. A new lease is being opened.
    LeaseLost,
}

/// The result of [`ClerkCore::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Held: the operation may proceed; call [`ClerkCore::finish`] when done.
    Held { token: FencingToken, epoch: LeaseEpoch },
    /// Requested: retry after [`ClerkOutput::Granted`] for this lock.
    Wait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    /// Opening `attempt`, first sent at `sent_at`.
    Opening { attempt: u64, sent_at: u64 },
    /// The lease `epoch`, answering opening `attempt`.
    Live { attempt: u64, epoch: LeaseEpoch, duration: u64, valid_until: u64, next_renew_at: u64 },
}

#[derive(Debug, Default)]
struct ClerkLock {
    held: Option<(Mode, FencingToken)>,
    /// The newest grant seen; older grants are stale.
    newest_token: FencingToken,
    /// The hold given up entirely last. The server may not have heard: a
    /// revoke or grant naming it is answered with the release again.
    released: Option<FencingToken>,
    /// Operations using the lock, by mode. Mutual exclusion between a
    /// workstation's own operations is the workstation's business.
    shared_users: u32,
    exclusive_users: u32,
    /// Wanted by a waiting operation: the mode, and when it was last requested.
    wanted: Option<(Mode, u64)>,
    /// The server wants the hold of this token down to `keep`.
    revoke: Option<(FencingToken, Option<Mode>)>,
    /// A flush for a revoke is running; the release follows `flush_done`.
    flushing: Option<Option<Mode>>,
    /// When it was granted while operations waited for it, until one of
    /// them has used it: a revoke that comes right behind the grant (the
    /// lock is wanted elsewhere too) must not take it away before they ran
    /// once, or a clerk could be granted a busy lock forever without using
    /// it. If nobody comes for it within `retransmit_micros`, the revoke
    /// goes ahead.
    fresh_grant: Option<u64>,
}

impl ClerkLock {
    fn in_use(&self) -> bool {
        self.shared_users > 0 || self.exclusive_users > 0
    }
}

/// One clerk's state.
#[derive(Debug)]
pub struct ClerkCore {
    clerk: ClerkId,
    config: ClerkConfig,
    lease: Lease,
    /// Lease openings are told apart by this (the driver seeds it uniquely
    /// per clerk process, so a restarted clerk never reuses one).
    next_attempt: u64,
    locks: BTreeMap<LockName, ClerkLock>,
    /// The locks with a request out or a fresh grant (a superset): the
    /// only ones `tick` has timers for, so a tick costs what is pending,
    /// not every lock held.
    pending: BTreeSet<LockName>,
    /// Renewals sent and not answered: sequence -> when sent.
    renewals: BTreeMap<u64, u64>,
    next_renewal: u64,
    recovering: BTreeSet<LeaseEpoch>,
    /// After a server restart: grants below this token come from the server
    /// that went away and are ignored.
    token_floor: FencingToken,
}

impl ClerkCore {
    /// A clerk that starts opening a lease at `now`. `first_attempt` must
    /// be above every attempt any earlier run of this clerk used (see
    /// [`ToServer::OpenLease`]).
    pub fn new(clerk: ClerkId, config: ClerkConfig, first_attempt: u64, now: u64) -> (Self, Vec<ClerkOutput>) {
        let core = ClerkCore {
            clerk,
            config,
            lease: Lease::Opening { attempt: first_attempt, sent_at: now },
            next_attempt: first_attempt + 1,
            locks: BTreeMap::new(),
            pending: BTreeSet::new(),
            renewals: BTreeMap::new(),
            next_renewal: 1,
            recovering: BTreeSet::new(),
            token_floor: FencingToken(0),
        };
        (core, vec![ClerkOutput::Send(ToServer::OpenLease { clerk, attempt: first_attempt })])
    }

    /// The lease, if it is valid at `now`.
    pub fn lease(&self, now: u64) -> Option<LeaseEpoch> {
        match self.lease {
            Lease::Live { epoch, valid_until, .. } if now < valid_until => Some(epoch),
            _ => None,
        }
    }

    /// The mode `lock` is held in at `now` (nothing without a valid lease).
    pub fn holds(&self, lock: LockName, now: u64) -> Option<(Mode, FencingToken)> {
        self.lease(now)?;
        self.locks.get(&lock).and_then(|state| state.held)
    }

    /// The message that introduces this clerk on a new connection: its
    /// current opening again (the server answers a repeated opening with the
    /// same lease, and now knows where the clerk is).
    pub fn hello(&self) -> ToServer {
        let attempt = match self.lease {
            Lease::Opening { attempt, .. } | Lease::Live { attempt, .. } => attempt,
        };
        ToServer::OpenLease { clerk: self.clerk, attempt }
    }

    /// The clerk's state of `lock`, for diagnostics.
    pub fn describe(&self, lock: LockName) -> String {
        format!("{:?} {:?}", self.lease, self.locks.get(&lock))
    }

    /// Operations counted as using `lock`: (shared, exclusive).
    pub fn users(&self, lock: LockName) -> (u32, u32) {
        self.locks.get(&lock).map_or((0, 0), |state| (state.shared_users, state.exclusive_users))
    }

    /// An operation wants `lock` in `mode`.
    pub fn acquire(&mut self, lock: LockName, mode: Mode, now: u64) -> (Acquire, Vec<ClerkOutput>) {
        let mut out = Vec::new();
        let lease = self.lease(now);
        let state = self.locks.entry(lock).or_default();
        let settling = (state.revoke.is_some() && state.fresh_grant.is_none()) || state.flushing.is_some();
        if let (Some(epoch), Some((held, token))) = (lease, state.held)
            && held.covers(mode)
            && !settling
        {
            match mode {
                Mode::Shared => state.shared_users += 1,
                Mode::Exclusive => state.exclusive_users += 1,
            }
            return (Acquire::Held { token, epoch }, out);
        }
        let wanted = state.wanted.map_or(mode, |(wanted, _)| wanted.max(mode));
        let already_asked = state.wanted.is_some_and(|(asked, _)| asked >= wanted);
        state.wanted = Some((wanted, if already_asked { state.wanted.expect("asked").1 } else { now }));
        self.pending.insert(lock);
        if !already_asked
            && !settling
            && !state.held.is_some_and(|(held, _)| held.covers(wanted))
            && let Some(epoch) = lease
        {
            out.push(ClerkOutput::Send(ToServer::Request { epoch, lock, mode: wanted }));
        }
        (Acquire::Wait, out)
    }

    /// An operation that acquired `lock` in `mode` is done with it. The lock
    /// stays cached; a pending revoke may now proceed.
    pub fn finish(&mut self, lock: LockName, mode: Mode) -> Vec<ClerkOutput> {
        let Some(state) = self.locks.get_mut(&lock) else { return Vec::new() };
        match mode {
            Mode::Shared => state.shared_users = state.shared_users.saturating_sub(1),
            Mode::Exclusive => state.exclusive_users = state.exclusive_users.saturating_sub(1),
        }
        state.fresh_grant = None;
        let mut out = Vec::new();
        Self::start_flush_if_free(lock, state, &mut out);
        out
    }

    fn start_flush_if_free(lock: LockName, state: &mut ClerkLock, out: &mut Vec<ClerkOutput>) {
        let Some((_, keep)) = state.revoke else { return };
        if state.flushing.is_some() {
            return;
        }
        let blocked = match keep {
            None => state.in_use(),
            Some(_) => state.exclusive_users > 0,
        };
        if !blocked && state.fresh_grant.is_none() {
            state.revoke = None;
            state.flushing = Some(keep);
            out.push(ClerkOutput::Flush { lock, keep });
        }
    }

    /// The workstation flushed what `lock` covers: release it (down to the
    /// revoke's `keep`).
    pub fn flush_done(&mut self, lock: LockName, now: u64) -> Vec<ClerkOutput> {
        let mut out = Vec::new();
        let lease = self.lease(now);
        let Some(state) = self.locks.get_mut(&lock) else { return out };
        let Some(keep) = state.flushing.take() else { return out };
        let Some((held, token)) = state.held else { return out };
        if let Some(epoch) = lease {
            out.push(ClerkOutput::Send(ToServer::Release { epoch, lock, token, keep }));
        }
        state.held = keep.map(|keep| (keep.min(held), token));
        if keep.is_none() {
            state.released = Some(token);
        }
        // A stronger revoke may have come meanwhile; and a waiting operation
        // needs the lock back.
        Self::start_flush_if_free(lock, state, &mut out);
        if let (Some(epoch), Some((wanted, _))) = (lease, state.wanted)
            && state.flushing.is_none()
            && state.revoke.is_none()
        {
            match state.held {
                Some((held, token)) if held.covers(wanted) => {
                    // What is kept is enough for the waiting operation.
                    state.wanted = None;
                    out.push(ClerkOutput::Granted { lock, mode: held, token });
                }
                _ => {
                    state.wanted = Some((wanted, now));
                    out.push(ClerkOutput::Send(ToServer::Request { epoch, lock, mode: wanted }));
                }
            }
        }
        out
    }

    /// The workstation replayed the log of `dead`.
    pub fn recovery_done(&mut self, dead: LeaseEpoch, now: u64) -> Vec<ClerkOutput> {
        self.recovering.remove(&dead);
        match self.lease(now) {
            Some(epoch) => vec![ClerkOutput::Send(ToServer::RecoveryDone { epoch, dead })],
            None => Vec::new(),
        }
    }

    /// A message from the server.
    pub fn on_message(&mut self, message: ToClerk, now: u64) -> Vec<ClerkOutput> {
        let mut out = Vec::new();
        if let ToClerk::LeaseGranted { attempt, epoch, duration_micros } = message {
            if let Lease::Opening { attempt: opening, sent_at } = self.lease
                && opening == attempt
            {
                let valid_until = (sent_at + duration_micros).saturating_sub(self.config.lease_margin_micros);
                self.lease = Lease::Live {
                    attempt,
                    epoch,
                    duration: duration_micros,
                    valid_until,
                    next_renew_at: now + self.config.renew_every_micros,
                };
                out.push(ClerkOutput::LeaseReady { epoch });
                // Operations that waited for the lease ask now.
                for (lock, state) in self.locks.iter_mut() {
                    if let Some((wanted, _)) = state.wanted {
                        state.wanted = Some((wanted, now));
                        out.push(ClerkOutput::Send(ToServer::Request { epoch, lock: *lock, mode: wanted }));
                    }
                }
            }
            return out;
        }
        let Lease::Live { epoch: current, duration, valid_until, .. } = self.lease else { return out };
        if message.epoch() != current || now >= valid_until {
            return out;
        }
        match message {
            ToClerk::LeaseGranted { .. } => {}
            ToClerk::LeaseRenewed { sequence, .. } => {
                if let Some(sent_at) = self.renewals.remove(&sequence)
                    && let Lease::Live { valid_until, .. } = &mut self.lease
                {
                    let renewed = (sent_at + duration).saturating_sub(self.config.lease_margin_micros);
                    *valid_until = (*valid_until).max(renewed);
                }
                // Older unanswered renewals are not needed any more.
                self.renewals.retain(|pending, _| *pending > sequence);
            }
            ToClerk::LeaseLost { .. } => self.lose_lease(now, &mut out),
            ToClerk::Grant { lock, mode, token, .. } => {
                let state = self.locks.entry(lock).or_default();
                if state.released == Some(token) {
                    // The server still thinks we hold what we released: our
                    // release was lost (or this grant is a late duplicate).
                    out.push(ClerkOutput::Send(ToServer::Release { epoch: current, lock, token, keep: None }));
                    return out;
                }
                if token <= state.newest_token || token < self.token_floor {
                    // A duplicate, older than what we already know, or a
                    // delayed grant of a server that has since restarted.
                    return out;
                }
                state.newest_token = token;
                state.held = Some((mode, token));
                state.fresh_grant = state.wanted.is_some().then_some(now);
                if state.revoke.is_some_and(|(revoked, _)| revoked < token) {
                    state.revoke = None;
                }
                if state.wanted.is_some_and(|(wanted, _)| mode.covers(wanted)) {
                    state.wanted = None;
                }
                out.push(ClerkOutput::Granted { lock, mode, token });
            }
            ToClerk::Revoke { lock, token, held: revoked_mode, keep, .. } => {
                let state = self.locks.entry(lock).or_default();
                if token > state.newest_token && token >= self.token_floor {
                    // The grant of this hold never arrived (lost, or still on
                    // its way). The server counts it as ours, so it is.
                    state.newest_token = token;
                    state.held = Some((revoked_mode, token));
                    state.fresh_grant = state.wanted.is_some().then_some(now);
                    if state.wanted.is_some_and(|(wanted, _)| revoked_mode.covers(wanted)) {
                        state.wanted = None;
                    }
                    out.push(ClerkOutput::Granted { lock, mode: revoked_mode, token });
                }
                let held = match state.held {
                    Some((held, held_token)) if held_token == token => held,
                    _ => {
                        if state.released == Some(token) {
                            // Released entirely; the server did not hear it.
                            out.push(ClerkOutput::Send(ToServer::Release { epoch: current, lock, token, keep: None }));
                        }
                        return out; // otherwise stale
                    }
                };
                if keep.is_some_and(|keep| keep.covers(held)) {
                    // Already down that far: the downgrade was not heard.
                    let release = ToServer::Release { epoch: current, lock, token, keep: Some(held) };
                    out.push(ClerkOutput::Send(release));
                    return out;
                }
                let demand = |keep: Option<Mode>| if keep.is_none() { 2 } else { 1 };
                let pending =
                    state.revoke.map(|(_, pending)| demand(pending)).max(state.flushing.map(demand)).unwrap_or(0);
                if demand(keep) > pending {
                    state.revoke = Some((token, keep));
                }
                Self::start_flush_if_free(lock, state, &mut out);
            }
            ToClerk::Recover { dead, dead_clerk, .. } => {
                if self.recovering.insert(dead) {
                    out.push(ClerkOutput::Recover { dead, dead_clerk });
                }
            }
            ToClerk::ReclaimLocks { first_token, .. } => {
                // The server restarted: tell it every lock held (again, if
                // asked again: the answer may have been lost).
                self.token_floor = self.token_floor.max(first_token);
                let holdings: Vec<(LockName, Mode, FencingToken)> = self
                    .locks
                    .iter()
                    .filter_map(|(lock, state)| state.held.map(|(mode, token)| (*lock, mode, token)))
                    .collect();
                if holdings.len() > RECLAIM_LOCKS_MAX {
                    // Too many to list: give the lease up rather than keep
                    // locks the server does not know of.
                    self.lose_lease(now, &mut out);
                    return out;
                }
                out.push(ClerkOutput::Send(ToServer::Reclaim { epoch: current, first_token, holdings }));
            }
        }
        out
    }

    /// Renews the lease, repeats unanswered openings and requests, and
    /// notices a lease that ran out.
    pub fn tick(&mut self, now: u64) -> Vec<ClerkOutput> {
        let mut out = Vec::new();
        match self.lease {
            Lease::Opening { attempt, sent_at } => {
                // Retransmissions keep the first send time: the answer may be to it.
                if now.saturating_sub(sent_at) >= self.config.retransmit_micros {
                    out.push(ClerkOutput::Send(ToServer::OpenLease { clerk: self.clerk, attempt }));
                }
                return out;
            }
            Lease::Live { valid_until, .. } if now >= valid_until => {
                self.lose_lease(now, &mut out);
                return out;
            }
            Lease::Live { attempt, epoch, duration, valid_until, next_renew_at } => {
                if now >= next_renew_at {
                    let sequence = self.next_renewal;
                    self.next_renewal += 1;
                    self.renewals.insert(sequence, now);
                    self.lease = Lease::Live {
                        attempt,
                        epoch,
                        duration,
                        valid_until,
                        next_renew_at: now + self.config.renew_every_micros,
                    };
                    out.push(ClerkOutput::Send(ToServer::RenewLease { epoch, sequence }));
                }
                let locks = &mut self.locks;
                self.pending.retain(|lock| {
                    let Some(state) = locks.get_mut(lock) else { return false };
                    if state
                        .fresh_grant
                        .is_some_and(|granted| now.saturating_sub(granted) >= self.config.retransmit_micros)
                    {
                        // Nobody came for it: let a pending revoke proceed.
                        state.fresh_grant = None;
                        Self::start_flush_if_free(*lock, state, &mut out);
                    }
                    if let Some((wanted, asked)) = state.wanted
                        && state.flushing.is_none()
                        && now.saturating_sub(asked) >= self.config.retransmit_micros
                    {
                        state.wanted = Some((wanted, now));
                        out.push(ClerkOutput::Send(ToServer::Request { epoch, lock: *lock, mode: wanted }));
                    }
                    state.fresh_grant.is_some() || state.wanted.is_some()
                });
            }
        }
        out
    }

    fn lose_lease(&mut self, now: u64, out: &mut Vec<ClerkOutput>) {
        for state in self.locks.values_mut() {
            state.held = None;
            state.revoke = None;
            state.flushing = None;
            state.shared_users = 0;
            state.exclusive_users = 0;
            state.wanted = None;
        }
        self.renewals.clear();
        self.recovering.clear();
        out.push(ClerkOutput::LeaseLost);
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        self.lease = Lease::Opening { attempt, sent_at: now };
        out.push(ClerkOutput::Send(ToServer::OpenLease { clerk: self.clerk, attempt }));
    }
}
