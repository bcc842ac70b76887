//! The tokio drivers: a lock server and clerks over the kit's transport.
//!
//! They only move messages: every decision is in [`LockServerCore`] and
//! [`ClerkCore`], called under a mutex with the time in microseconds.
//!
//! - [`LockServer`] accepts connections; a connection belongs to the clerk
//!   whose `OpenLease` arrived on it (the newest connection wins). Fences go
//!   to the embedder's [`Fencer`]; a timer drives leases and retransmission.
//!   Its registry goes to a [`RegistryStore`]; started again on the same
//!   store, it restarts with a reclaim grace period.
//! - [`Clerk`] keeps one connection to the server (reconnecting with
//!   backoff), drives its lease with a timer, and calls the embedder's
//!   [`Workstation`] to flush before a release and to replay dead logs.
//!   [`Clerk::acquire`] returns a [`LockGuard`]; dropping it ends the
//!   operation, and the lock stays cached until the server revokes it.

use crate::clerk::{Acquire, ClerkConfig, ClerkCore, ClerkOutput};
use crate::protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, Mode, ToClerk, ToServer};
use crate::registry::{MemoryRegistryStore, RegistryStore, ServerRegistry};
use crate::server::{LockServerCore, ServerConfig, ServerOutput};
use common::transport::{BoxFuture, Connection, FrameSender, Transport};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, error, info, warn};

/// How often the server and clerks run their timers.
const TICK_INTERVAL: Duration = Duration::from_millis(5);
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Makes shared storage refuse every write stamped with a lease epoch.
pub trait Fencer: Send + Sync + fmt::Debug {
    /// Resolves once the fence is durable (on a write quorum of storage).
    fn fence(&self, epoch: LeaseEpoch) -> BoxFuture<'static, ()>;
}

/// What a clerk asks of its workstation.
pub trait Workstation: Send + Sync + fmt::Debug {
    /// Flush the log, then the dirty data `lock` covers; afterwards only
    /// `keep` is held (drop cached data it no longer covers).
    fn flush(&self, lock: LockName, keep: Option<Mode>) -> BoxFuture<'static, ()>;
    /// Replay the log of the dead lease `dead` of `dead_clerk`.
    fn recover(&self, dead: LeaseEpoch, dead_clerk: ClerkId) -> BoxFuture<'static, ()>;
    /// The lease is gone: drop every cached block; dirty data is lost.
    fn lease_lost(&self);
}

/// Wall-clock microseconds (the replicated mode's time: the same on every replica).
pub(crate) fn micros_since_epoch() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Sends a frame if connected; a frame that cannot go is dropped, which is
/// safe: both sides retransmit whatever they still wait for.
pub(crate) fn send_or_drop(sender: Option<FrameSender>, frame: bytes::Bytes) {
    if let Some(sender) = sender
        && let Err(error) = sender.try_send(frame)
    {
        debug!(%error, "lock message dropped (it is retransmitted)");
    }
}

/// Runs `tick` every `TICK_INTERVAL` until the task is aborted.
fn spawn_ticker(mut tick: impl FnMut() + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK_INTERVAL);
        loop {
            interval.tick().await;
            tick();
        }
    })
}

#[derive(Debug)]
struct ServerShared {
    core: Mutex<LockServerCore>,
    clerks: Mutex<HashMap<ClerkId, FrameSender>>,
    fencer: Arc<dyn Fencer>,
    store: Arc<dyn RegistryStore>,
    /// Serializes saves, so an older registry never overwrites a newer one.
    saving: Mutex<()>,
    /// Every task of the server, so that `stop` ends them all.
    tasks: Mutex<Vec<AbortHandle>>,
    start: Instant,
}

impl ServerShared {
    fn now(&self) -> u64 {
        micros_since(self.start)
    }

    /// Saves the core's registry as it is now (which includes whatever an
    /// earlier `Persist` asked for). A server that cannot save stops, as if
    /// it crashed: it must not hand out a lease a restart would forget.
    fn save_registry(&self) -> bool {
        let _saving = self.saving.lock();
        let registry = self.core.lock().registry();
        match self.store.save(&registry) {
            Ok(()) => true,
            Err(failure) => {
                error!(%failure, "lock server cannot save its registry; stopping");
                self.stop();
                false
            }
        }
    }

    fn stop(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        self.clerks.lock().clear();
    }

    /// Spawns a task of the server: `stop` ends it (a fence finishing after
    /// a stop must not save the stopped server's registry).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = self.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle.abort_handle());
    }

    fn carry_out(self: &Arc<Self>, outputs: Vec<ServerOutput>) {
        for output in outputs {
            match output {
                ServerOutput::Persist(_) => {
                    if !self.save_registry() {
                        return;
                    }
                }
                ServerOutput::Send { to, message } => {
                    let sender = self.clerks.lock().get(&to).cloned();
                    send_or_drop(sender, message.encode());
                }
                ServerOutput::Fence { epoch } => {
                    let shared = self.clone();
                    self.spawn(async move {
                        shared.fencer.fence(epoch).await;
                        let outputs = shared.core.lock().fence_durable(epoch, shared.now());
                        shared.carry_out(outputs);
                    });
                }
            }
        }
    }
}

/// A lock server on the transport.
#[derive(Debug)]
pub struct LockServer {
    shared: Arc<ServerShared>,
    local_address: String,
}

impl LockServer {
    /// Listens at `address` ("127.0.0.1:0" for any port), with its registry
    /// in memory (it cannot be restarted).
    pub async fn start(
        config: ServerConfig,
        transport: Arc<dyn Transport>,
        address: String,
        fencer: Arc<dyn Fencer>,
    ) -> io::Result<LockServer> {
        Self::start_with_registry(config, transport, address, fencer, Arc::new(MemoryRegistryStore::default())).await
    }

    /// Listens at `address`, starting from the registry in `store`: a server
    /// started again on the store an earlier run used restarts, with a grace
    /// period in which clerks reclaim their locks and nothing else is granted.
    pub async fn start_with_registry(
        config: ServerConfig,
        transport: Arc<dyn Transport>,
        address: String,
        fencer: Arc<dyn Fencer>,
        store: Arc<dyn RegistryStore>,
    ) -> io::Result<LockServer> {
        let registry = store.load()?;
        let restarting = registry != ServerRegistry::default();
        let (core, first_outputs) = if restarting {
            info!(leases = registry.leases.len(), generation = registry.generation + 1, "lock server restarting");
            LockServerCore::restart(config, registry, 0)
        } else {
            (LockServerCore::new(config), Vec::new())
        };
        let mut listener = transport.bind(address).await?;
        let local_address = listener.local_address().to_string();
        let shared = Arc::new(ServerShared {
            core: Mutex::new(core),
            clerks: Mutex::new(HashMap::new()),
            fencer,
            store,
            saving: Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            start: Instant::now(),
        });
        // The new generation is saved before anything is granted.
        if !shared.save_registry() {
            return Err(io::Error::other("the lock server could not save its registry"));
        }
        shared.carry_out(
            first_outputs.into_iter().filter(|output| !matches!(output, ServerOutput::Persist(_))).collect(),
        );
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok(connection) = listener.accept().await {
                let shared = accept_shared.clone();
                accept_shared.spawn(async move { serve_clerk(shared, connection).await });
            }
        });
        let tick_shared = shared.clone();
        let ticker = spawn_ticker(move || {
            let outputs = tick_shared.core.lock().tick(tick_shared.now());
            tick_shared.carry_out(outputs);
        });
        shared.tasks.lock().extend([accept.abort_handle(), ticker.abort_handle()]);
        Ok(LockServer { shared, local_address })
    }

    pub fn local_address(&self) -> &str {
        &self.local_address
    }

    /// Holders of `lock`, as the server sees them.
    pub fn holders(&self, lock: LockName) -> Vec<(LeaseEpoch, Mode, FencingToken)> {
        self.shared.core.lock().holders(lock)
    }

    /// Stops the server as a crash would: every connection closes, and
    /// all lock and lease state is gone with it, except the saved registry.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

impl Drop for LockServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server's side of one clerk connection: it belongs to the clerk whose
/// `OpenLease` came on it, whose messages go out through it from then on.
pub(crate) struct ClerkConnection {
    connection: Connection,
    clerk: Option<ClerkId>,
}

impl ClerkConnection {
    pub(crate) fn new(connection: Connection) -> Self {
        ClerkConnection { connection, clerk: None }
    }

    /// The next message and its clerk; `None` once the connection ends, or
    /// is closed for a bad frame or a message before any `OpenLease`.
    pub(crate) async fn next(&mut self, clerks: &Mutex<HashMap<ClerkId, FrameSender>>) -> Option<(ClerkId, ToServer)> {
        let frame = self.connection.receiver.recv().await?;
        let peer = &self.connection.peer;
        let message = match frame
            .map_err(|error| error.to_string())
            .and_then(|frame| ToServer::decode(&frame).map_err(|error| error.to_string()))
        {
            Ok(message) => message,
            Err(reason) => {
                warn!(%peer, reason, "closing lock connection: bad frame");
                return None;
            }
        };
        if let ToServer::OpenLease { clerk: opening, .. } = message {
            self.clerk = Some(opening);
            clerks.lock().insert(opening, self.connection.sender.clone());
        }
        match self.clerk {
            Some(from) => Some((from, message)),
            None => {
                warn!(%peer, "closing lock connection: a message before OpenLease");
                None
            }
        }
    }
}

async fn serve_clerk(shared: Arc<ServerShared>, connection: Connection) {
    let mut connection = ClerkConnection::new(connection);
    while let Some((from, message)) = connection.next(&shared.clerks).await {
        let outputs = shared.core.lock().handle(from, message, shared.now());
        shared.carry_out(outputs);
    }
}

/// Why a clerk call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClerkError {
    #[error("{lock} was not granted within {waited:?}")]
    Timeout { lock: LockName, waited: Duration },
    #[error("no lease from the lock server within {0:?}")]
    NoLease(Duration),
}

#[derive(Debug)]
struct ClerkShared {
    core: Mutex<ClerkCore>,
    /// One link per server address (one, or every replica of mode 2):
    /// every message goes to each connected one.
    senders: Mutex<Vec<Option<FrameSender>>>,
    workstation: Arc<dyn Workstation>,
    /// Signalled on every grant and on a new lease: waiting acquires retry.
    changed: Notify,
    start: Instant,
    messages_sent: AtomicU64,
    flushes: AtomicU64,
}

/// What a clerk has done so far (for benchmarks: lock traffic per operation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClerkStats {
    /// Messages sent to the lock service (each counted once, even when
    /// mode 2 sends it to every replica).
    pub messages_sent: u64,
    /// Revokes served: flushes the server asked for.
    pub flushes: u64,
}

impl ClerkShared {
    fn now(&self) -> u64 {
        micros_since(self.start)
    }

    fn carry_out(self: &Arc<Self>, outputs: Vec<ClerkOutput>) {
        for output in outputs {
            match output {
                ClerkOutput::Send(message) => {
                    self.messages_sent.fetch_add(1, Ordering::Relaxed);
                    let frame = message.encode();
                    for sender in self.senders.lock().iter().flatten() {
                        send_or_drop(Some(sender.clone()), frame.clone());
                    }
                }
                ClerkOutput::LeaseReady { .. } | ClerkOutput::Granted { .. } => self.changed.notify_waiters(),
                ClerkOutput::Flush { lock, keep } => {
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                    let shared = self.clone();
                    tokio::spawn(async move {
                        shared.workstation.flush(lock, keep).await;
                        let outputs = shared.core.lock().flush_done(lock, shared.now());
                        shared.carry_out(outputs);
                    });
                }
                ClerkOutput::Recover { dead, dead_clerk } => {
                    let shared = self.clone();
                    tokio::spawn(async move {
                        shared.workstation.recover(dead, dead_clerk).await;
                        let outputs = shared.core.lock().recovery_done(dead, shared.now());
                        shared.carry_out(outputs);
                    });
                }
                ClerkOutput::LeaseLost => {
                    self.workstation.lease_lost();
                    self.changed.notify_waiters();
                }
            }
        }
    }
}

/// A clerk connected to a lock server.
#[derive(Debug)]
pub struct Clerk {
    shared: Arc<ClerkShared>,
    tasks: Vec<JoinHandle<()>>,
}

/// One operation's hold of a lock; dropping it ends the operation (the lock
/// itself stays cached).
#[derive(Debug)]
pub struct LockGuard {
    shared: Arc<ClerkShared>,
    pub lock: LockName,
    pub mode: Mode,
    /// Stamp both on every write to shared storage made under this lock.
    pub token: FencingToken,
    pub epoch: LeaseEpoch,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let outputs = self.shared.core.lock().finish(self.lock, self.mode);
        self.shared.carry_out(outputs);
    }
}

impl Clerk {
    /// Connects clerk `clerk` to the server at `address` and waits for its
    /// lease (at most `lease_timeout`).
    pub async fn connect(
        clerk: ClerkId,
        config: ClerkConfig,
        transport: Arc<dyn Transport>,
        address: String,
        workstation: Arc<dyn Workstation>,
        lease_timeout: Duration,
    ) -> Result<Clerk, ClerkError> {
        Self::connect_replicated(clerk, config, transport, vec![address], workstation, lease_timeout).await
    }

    /// Connects clerk `clerk` to every replica of a replicated lock service
    /// (mode 2, [`crate::replicated`]): each message goes to all of them,
    /// and whichever leads answers.
    pub async fn connect_replicated(
        clerk: ClerkId,
        config: ClerkConfig,
        transport: Arc<dyn Transport>,
        addresses: Vec<String>,
        workstation: Arc<dyn Workstation>,
        lease_timeout: Duration,
    ) -> Result<Clerk, ClerkError> {
        // Openings must grow across restarts of this clerk: start from the clock.
        let first_attempt = micros_since_epoch();
        let start = Instant::now();
        // The opening goes out on each link as it connects (`hello`).
        let (core, _opening) = ClerkCore::new(clerk, config, first_attempt, 0);
        let shared = Arc::new(ClerkShared {
            core: Mutex::new(core),
            senders: Mutex::new(vec![None; addresses.len()]),
            workstation,
            changed: Notify::new(),
            start,
            messages_sent: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let mut tasks: Vec<JoinHandle<()>> = addresses
            .into_iter()
            .enumerate()
            .map(|(index, address)| tokio::spawn(run_link(shared.clone(), transport.clone(), index, address)))
            .collect();
        let tick_shared = shared.clone();
        tasks.push(spawn_ticker(move || {
            let outputs = tick_shared.core.lock().tick(tick_shared.now());
            tick_shared.carry_out(outputs);
        }));
        let clerk = Clerk { shared: shared.clone(), tasks };
        let deadline = tokio::time::Instant::now() + lease_timeout;
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if clerk.lease().is_some() {
                return Ok(clerk);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(ClerkError::NoLease(lease_timeout));
            }
        }
    }

    /// The clerk's state of `lock`, for diagnostics.
    pub fn describe(&self, lock: LockName) -> String {
        self.shared.core.lock().describe(lock)
    }

    pub fn stats(&self) -> ClerkStats {
        ClerkStats {
            messages_sent: self.shared.messages_sent.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
        }
    }

    /// The current lease, if valid.
    pub fn lease(&self) -> Option<LeaseEpoch> {
        self.shared.core.lock().lease(self.shared.now())
    }

    /// Holds `lock` in `mode` for one operation, waiting at most `timeout`.
    pub async fn acquire(&self, lock: LockName, mode: Mode, timeout: Duration) -> Result<LockGuard, ClerkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (acquired, outputs) = self.shared.core.lock().acquire(lock, mode, self.shared.now());
            self.shared.carry_out(outputs);
            if let Acquire::Held { token, epoch } = acquired {
                return Ok(LockGuard { shared: self.shared.clone(), lock, mode, token, epoch });
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(ClerkError::Timeout { lock, waited: timeout });
            }
        }
    }

    /// Holds every lock of `locks` for one operation (a lock listed twice is
    /// taken in the stronger mode). They are taken in sorted order, so
    /// clerks taking overlapping sets never deadlock (F97 §5, phase 2). An
    /// operation that read anything before locking must re-check it once
    /// this returns, and start over (drop the guards, call again) if it
    /// changed.
    pub async fn acquire_all(
        &self,
        locks: &[(LockName, Mode)],
        timeout: Duration,
    ) -> Result<Vec<LockGuard>, ClerkError> {
        let mut sorted: std::collections::BTreeMap<LockName, Mode> = std::collections::BTreeMap::new();
        for (lock, mode) in locks {
            let entry = sorted.entry(*lock).or_insert(*mode);
            *entry = (*entry).max(*mode);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut guards = Vec::with_capacity(sorted.len());
        for (lock, mode) in sorted {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            guards.push(self.acquire(lock, mode, left).await?);
        }
        Ok(guards)
    }

    /// Stops the clerk as a crash would: no more renewals, releases or answers.
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.senders.lock().iter_mut().for_each(|sender| *sender = None);
    }
}

impl Drop for Clerk {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps link `index` connected to `address`; each connection starts by
/// introducing the clerk (its current lease opening).
async fn run_link(shared: Arc<ClerkShared>, transport: Arc<dyn Transport>, index: usize, address: String) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        match transport.connect(address.clone()).await {
            Ok(mut connection) => {
                backoff = RECONNECT_BACKOFF_MIN;
                shared.senders.lock()[index] = Some(connection.sender.clone());
                let hello = shared.core.lock().hello();
                send_or_drop(Some(connection.sender.clone()), hello.encode());
                while let Some(frame) = connection.receiver.recv().await {
                    let message = match frame
                        .map_err(|error| error.to_string())
                        .and_then(|frame| ToClerk::decode(&frame).map_err(|error| error.to_string()))
                    {
                        Ok(message) => message,
                        Err(reason) => {
                            warn!(reason, "closing the lock-server connection: bad frame");
                            break;
                        }
                    };
                    let outputs = shared.core.lock().on_message(message, shared.now());
                    shared.carry_out(outputs);
                }
                shared.senders.lock()[index] = None;
                warn!(%address, "connection to the lock server lost; reconnecting");
            }
            Err(error) => debug!(%address, %error, "lock server connect failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}
