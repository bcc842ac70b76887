//! Mode 2: the lock service replicated on three servers with `openraft`.
//!
//! The replicated state is the whole [`LockServerCore`]: every input it
//! takes (a clerk message, a tick, a fence becoming durable) is a Raft log
//! entry ([`LockCommand`]) carrying the time it was proposed at, and every
//! replica applies the committed entries in order, so all cores go through
//! the same states: membership, leases, lock holders and tokens alike.
//! Only the leader acts on the outputs (it proposed the entry, and
//! `client_write` hands them back to it).
//!
//! - **Clerks** connect to every replica ([`crate::Clerk::connect_replicated`])
//!   and send each message to all; followers drop them. After a failover the
//!   new leader already has their connections, and its core already knows
//!   their leases and locks: a clerk keeps every lock it held.
//! - **Outputs lost with an old leader** are made good by the protocol's
//!   retransmissions (requests, revokes, recovery requests), except fences,
//!   which the leader asks for again on every tick while one is pending and
//!   nobody on it sees it through ([`LockServerCore::fences_pending`]).
//! - **Time** is the proposing leader's wall clock, so leases run on across
//!   a failover (replicas are assumed to have clocks within the lease
//!   margin, and slewed, not stepped: a jump moves every lease at once).
//! - **Durability**: the Raft log, the vote and snapshots live in memory. The
//!   service survives the loss of any one replica, not of all three; the
//!   single server of mode 1 ([`crate::registry`]) is the one that survives
//!   restarts. A stopped replica must not be started again under its id:
//!   having forgotten its vote, it could vote twice in one term. (Replace it
//!   with a new id through a membership change instead; not built.)
//!
//! Raft messages travel in the kit's frames, kinds 50 (request) and 51
//! (answer), one request per connection, encoded with postcard.

use crate::net::{ClerkConnection, Fencer, micros_since_epoch, send_or_drop};
use crate::protocol::{ClerkId, LeaseEpoch, ToServer};
use crate::server::{LockServerCore, ServerConfig, ServerOutput};
use common::frame::encode_frame;
use common::limits::FRAME_PAYLOAD_BYTES_MAX;
use common::transport::{Connection, FrameSender, Listener, Transport};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, Raft, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, TokioRuntime, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

const RAFT_REQUEST_KIND: u8 = 50;
const RAFT_ANSWER_KIND: u8 = 51;
/// How long one Raft RPC may take.
const RAFT_RPC_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the leader proposes a tick (leases, revoke retransmission).
const TICK_EVERY: Duration = Duration::from_millis(20);

openraft::declare_raft_types!(
    /// The Raft types of the replicated lock service.
    pub LockRaft:
        D = LockCommand,
        R = LockOutputs,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<LockRaft>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = TokioRuntime,
);

/// One input of the replicated lock server, with the time it was proposed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockCommand {
    Handle { from: ClerkId, message: ToServer, now: u64 },
    Tick { now: u64 },
    FenceDurable { epoch: LeaseEpoch, now: u64 },
}

/// What applying one command asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOutputs(pub Vec<ServerOutput>);

fn apply_command(core: &mut LockServerCore, command: LockCommand) -> Vec<ServerOutput> {
    match command {
        LockCommand::Handle { from, message, now } => core.handle(from, message, now),
        LockCommand::Tick { now } => core.tick(now),
        LockCommand::FenceDurable { epoch, now } => core.fence_durable(epoch, now),
    }
}

type Error = StorageError<u64>;

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(io::Error::other)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

/// The Raft log and vote, in memory.
#[derive(Debug, Default)]
struct LogInner {
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    last_purged: Option<LogId<u64>>,
    entries: BTreeMap<u64, Entry<LockRaft>>,
}

/// The log store of one replica (clones share it).
#[derive(Clone, Debug, Default)]
pub struct LogStore(Arc<Mutex<LogInner>>);

impl RaftLogReader<LockRaft> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<LockRaft>>, Error> {
        Ok(self.0.lock().entries.range(range).map(|(_, entry)| entry.clone()).collect())
    }
}

impl RaftLogStorage<LockRaft> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<LockRaft>, Error> {
        let inner = self.0.lock();
        let last = inner.entries.values().next_back().map(|entry| entry.log_id).or(inner.last_purged);
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        self.0.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        Ok(self.0.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Error> {
        self.0.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Error> {
        Ok(self.0.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<LockRaft>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<LockRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = self.0.lock();
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        self.0.lock().entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        let mut inner = self.0.lock();
        inner.last_purged = Some(log_id);
        inner.entries = inner.entries.split_off(&(log_id.index + 1));
        Ok(())
    }
}

/// The replicated state of one replica.
#[derive(Debug)]
struct MachineInner {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    core: LockServerCore,
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// The state machine of one replica: a [`LockServerCore`] (clones share it).
#[derive(Clone, Debug)]
pub struct StateMachine(Arc<Mutex<MachineInner>>);

impl StateMachine {
    fn new(config: ServerConfig) -> StateMachine {
        StateMachine(Arc::new(Mutex::new(MachineInner {
            last_applied: None,
            membership: StoredMembership::default(),
            core: LockServerCore::new(config),
            snapshot: None,
            snapshots_built: 0,
        })))
    }
}

type SnapshotBody = (Option<LogId<u64>>, StoredMembership<u64, BasicNode>, LockServerCore);

impl RaftSnapshotBuilder<LockRaft> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<LockRaft>, Error> {
        let mut inner = self.0.lock();
        let data = encode(&(inner.last_applied, &inner.membership, &inner.core))
            .map_err(|error| StorageIOError::write_snapshot(None, &error))?;
        inner.snapshots_built += 1;
        let last = inner.last_applied.map_or(0, |log_id| log_id.index);
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{last}-{}", inner.snapshots_built),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<LockRaft> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), Error> {
        let inner = self.0.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<LockOutputs>, Error>
    where
        I: IntoIterator<Item = Entry<LockRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.0.lock();
        let mut answers = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let outputs = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(command) => apply_command(&mut inner.core, command),
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            answers.push(LockOutputs(outputs));
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let (last_applied, membership, core): SnapshotBody =
            decode(&data).map_err(|error| StorageIOError::read_snapshot(Some(meta.signature()), &error))?;
        let mut inner = self.0.lock();
        inner.last_applied = last_applied;
        inner.membership = membership;
        inner.core = core;
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<LockRaft>>, Error> {
        let inner = self.0.lock();
        Ok(inner
            .snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.clone())) }))
    }
}

/// A Raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
enum RaftRequest {
    AppendEntries(AppendEntriesRequest<LockRaft>),
    InstallSnapshot(InstallSnapshotRequest<LockRaft>),
    Vote(VoteRequest<u64>),
}

#[derive(Debug, Serialize, Deserialize)]
enum RaftAnswer {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
}

/// Opens a connection per RPC to another replica's Raft address.
#[derive(Clone, Debug)]
pub struct RaftPeers {
    transport: Arc<dyn Transport>,
}

/// One peer, as openraft sees it.
#[derive(Debug)]
pub struct RaftPeer {
    transport: Arc<dyn Transport>,
    target: u64,
    address: String,
}

impl RaftNetworkFactory<LockRaft> for RaftPeers {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> RaftPeer {
        RaftPeer { transport: self.transport.clone(), target, address: node.addr.clone() }
    }
}

impl RaftPeer {
    async fn call(&self, request: &RaftRequest) -> Result<RaftAnswer, NetworkError> {
        let exchange = async {
            let mut connection = self.transport.connect(self.address.clone()).await?;
            let payload = encode(request)?;
            if payload.len() > FRAME_PAYLOAD_BYTES_MAX {
                let detail = format!("{} bytes exceed FRAME_PAYLOAD_BYTES_MAX", payload.len());
                return Err(io::Error::new(io::ErrorKind::InvalidInput, detail));
            }
            let frame = encode_frame(RAFT_REQUEST_KIND, &payload);
            connection.sender.try_send(frame).map_err(io::Error::other)?;
            let answer = connection
                .receiver
                .recv()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"))?
                .map_err(io::Error::other)?;
            decode::<RaftAnswer>(&answer.payload)
        };
        match tokio::time::timeout(RAFT_RPC_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(NetworkError::new(&error)),
            Err(_) => Err(NetworkError::new(&io::Error::new(io::ErrorKind::TimedOut, "raft RPC timed out"))),
        }
    }

    fn unexpected<E: std::error::Error>(answer: RaftAnswer) -> RPCError<u64, BasicNode, E> {
        let error = io::Error::new(io::ErrorKind::InvalidData, format!("mismatched raft answer {answer:?}"));
        RPCError::Network(NetworkError::new(&error))
    }
}

impl RaftNetwork<LockRaft> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<LockRaft>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(&RaftRequest::AppendEntries(rpc)).await.map_err(RPCError::Network)? {
            RaftAnswer::AppendEntries(result) => {
                result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<LockRaft>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(&RaftRequest::InstallSnapshot(rpc)).await.map_err(RPCError::Network)? {
            RaftAnswer::InstallSnapshot(result) => {
                result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            other => Err(Self::unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(&RaftRequest::Vote(rpc)).await.map_err(RPCError::Network)? {
            RaftAnswer::Vote(result) => {
                result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            other => Err(Self::unexpected(other)),
        }
    }
}

/// A replica whose listeners are bound, so that every replica's addresses
/// can be known before any of them starts.
#[derive(Debug)]
pub struct BoundReplica {
    id: u64,
    transport: Arc<dyn Transport>,
    raft_listener: Listener,
    clerk_listener: Listener,
}

impl BoundReplica {
    /// Binds replica `id` ("127.0.0.1:0" picks free ports).
    pub async fn bind(
        id: u64,
        transport: Arc<dyn Transport>,
        raft_address: String,
        clerk_address: String,
    ) -> io::Result<BoundReplica> {
        let raft_listener = transport.bind(raft_address).await?;
        let clerk_listener = transport.bind(clerk_address).await?;
        Ok(BoundReplica { id, transport, raft_listener, clerk_listener })
    }

    /// Where the other replicas reach this one.
    pub fn raft_address(&self) -> String {
        self.raft_listener.local_address().to_string()
    }

    /// Where clerks reach this one.
    pub fn clerk_address(&self) -> String {
        self.clerk_listener.local_address().to_string()
    }
}

struct ReplicaShared {
    id: u64,
    raft: Raft<LockRaft>,
    machine: StateMachine,
    clerks: Mutex<HashMap<ClerkId, FrameSender>>,
    fencer: Arc<dyn Fencer>,
    /// Fences this replica is seeing through now.
    fencing: Mutex<BTreeSet<LeaseEpoch>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for ReplicaShared {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ReplicaShared").field("id", &self.id).finish_non_exhaustive()
    }
}

/// One replica of the replicated lock service.
#[derive(Debug)]
pub struct ReplicatedLockServer {
    shared: Arc<ReplicaShared>,
    clerk_address: String,
}

impl ReplicaShared {
    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Proposes `command`; on the leader, carries out what applying it asked for.
    async fn propose(self: &Arc<Self>, command: LockCommand) {
        match self.raft.client_write(command).await {
            Ok(response) => self.carry_out(response.data.0),
            Err(error) => debug!(replica = self.id, %error, "proposal not committed here"),
        }
    }

    fn carry_out(self: &Arc<Self>, outputs: Vec<ServerOutput>) {
        for output in outputs {
            match output {
                ServerOutput::Send { to, message } => {
                    let sender = self.clerks.lock().get(&to).cloned();
                    send_or_drop(sender, message.encode());
                }
                ServerOutput::Fence { epoch } => self.fence(epoch),
                // The Raft log is this mode's durable state.
                ServerOutput::Persist(_) => {}
            }
        }
    }

    /// Sees a fence through, unless this replica already is.
    fn fence(self: &Arc<Self>, epoch: LeaseEpoch) {
        if !self.fencing.lock().insert(epoch) {
            return;
        }
        let shared = self.clone();
        let task = tokio::spawn(async move {
            shared.fencer.fence(epoch).await;
            shared.propose(LockCommand::FenceDurable { epoch, now: micros_since_epoch() }).await;
            shared.fencing.lock().remove(&epoch);
        });
        let mut tasks = self.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(task.abort_handle());
    }
}

impl ReplicatedLockServer {
    /// Starts a bound replica. `members` maps every replica's id to its Raft
    /// address (this one's included); the lowest id initializes the group.
    pub async fn start(
        bound: BoundReplica,
        config: ServerConfig,
        members: BTreeMap<u64, String>,
        fencer: Arc<dyn Fencer>,
    ) -> io::Result<ReplicatedLockServer> {
        let raft_config = openraft::Config {
            cluster_name: "lockserver".into(),
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
            // Entries are small (a clerk message, a tick): 64 stay far inside a frame.
            max_payload_entries: 64,
            max_in_snapshot_log_to_keep: 500,
            ..Default::default()
        }
        .validate()
        .map_err(io::Error::other)?;
        let machine = StateMachine::new(config);
        let peers = RaftPeers { transport: bound.transport.clone() };
        let raft = Raft::new(bound.id, Arc::new(raft_config), peers, LogStore::default(), machine.clone())
            .await
            .map_err(io::Error::other)?;
        let clerk_address = bound.clerk_address();
        let shared = Arc::new(ReplicaShared {
            id: bound.id,
            raft,
            machine,
            clerks: Mutex::new(HashMap::new()),
            fencer,
            fencing: Mutex::new(BTreeSet::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![
            tokio::spawn(serve_raft(shared.clone(), bound.raft_listener)).abort_handle(),
            tokio::spawn(accept_clerks(shared.clone(), bound.clerk_listener)).abort_handle(),
            tokio::spawn(lead(shared.clone())).abort_handle(),
        ];
        if members.keys().next() == Some(&bound.id) {
            let nodes: BTreeMap<u64, BasicNode> =
                members.iter().map(|(id, address)| (*id, BasicNode { addr: address.clone() })).collect();
            if let Err(error) = shared.raft.initialize(nodes).await {
                debug!(%error, "raft group already initialized");
            }
        }
        shared.tasks.lock().append(&mut tasks);
        info!(replica = bound.id, %clerk_address, "replicated lock server started");
        Ok(ReplicatedLockServer { shared, clerk_address })
    }

    pub fn clerk_address(&self) -> &str {
        &self.clerk_address
    }

    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Whether this replica is the leader now.
    pub fn is_leader(&self) -> bool {
        self.shared.is_leader()
    }

    /// Holders of `lock` in this replica's copy of the state.
    pub fn holders(
        &self,
        lock: crate::protocol::LockName,
    ) -> Vec<(LeaseEpoch, crate::protocol::Mode, crate::protocol::FencingToken)> {
        self.shared.machine.0.lock().core.holders(lock)
    }

    /// Stops the replica as a crash would.
    pub async fn stop(&self) {
        for task in self.shared.tasks.lock().drain(..) {
            task.abort();
        }
        self.shared.clerks.lock().clear();
        if let Err(error) = self.shared.raft.shutdown().await {
            debug!(%error, "raft shutdown");
        }
    }
}

/// Answers the other replicas' Raft RPCs.
async fn serve_raft(shared: Arc<ReplicaShared>, mut listener: Listener) {
    while let Ok(mut connection) = listener.accept().await {
        let replica = shared.clone();
        let task = tokio::spawn(async move {
            let shared = replica;
            let Some(Ok(frame)) = connection.receiver.recv().await else { return };
            if frame.kind != RAFT_REQUEST_KIND {
                warn!(kind = frame.kind, "closing raft connection: not a raft request");
                return;
            }
            let request: RaftRequest = match decode(&frame.payload) {
                Ok(request) => request,
                Err(error) => {
                    warn!(%error, "closing raft connection: bad request");
                    return;
                }
            };
            let answer = match request {
                RaftRequest::AppendEntries(rpc) => RaftAnswer::AppendEntries(shared.raft.append_entries(rpc).await),
                RaftRequest::InstallSnapshot(rpc) => {
                    RaftAnswer::InstallSnapshot(shared.raft.install_snapshot(rpc).await)
                }
                RaftRequest::Vote(rpc) => RaftAnswer::Vote(shared.raft.vote(rpc).await),
            };
            match encode(&answer) {
                Ok(bytes) if bytes.len() <= FRAME_PAYLOAD_BYTES_MAX => {
                    send_or_drop(Some(connection.sender), encode_frame(RAFT_ANSWER_KIND, &bytes));
                }
                Ok(bytes) => warn!(bytes = bytes.len(), "raft answer exceeds FRAME_PAYLOAD_BYTES_MAX"),
                Err(error) => warn!(%error, "raft answer not encodable"),
            }
        });
        let mut tasks = shared.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(task.abort_handle());
    }
}

async fn accept_clerks(shared: Arc<ReplicaShared>, mut listener: Listener) {
    while let Ok(connection) = listener.accept().await {
        let task = tokio::spawn(serve_clerk(shared.clone(), connection));
        let mut tasks = shared.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(task.abort_handle());
    }
}

/// Every clerk message goes into the log through the leader; a follower
/// drops it (the clerk sends it to the leader too).
async fn serve_clerk(shared: Arc<ReplicaShared>, connection: Connection) {
    let mut connection = ClerkConnection::new(connection);
    while let Some((from, message)) = connection.next(&shared.clerks).await {
        // The replicated core never restarts, so it never asks for a reclaim:
        // a (possibly huge) reclaim list has no place in the log.
        if matches!(message, ToServer::Reclaim { .. }) {
            continue;
        }
        if shared.is_leader() {
            shared.propose(LockCommand::Handle { from, message, now: micros_since_epoch() }).await;
        }
    }
}

/// While leader: proposes ticks, and asks again for every fence still
/// pending that nobody here is seeing through (an earlier leader's, or one
/// whose durability could not be proposed while this replica was not leader).
async fn lead(shared: Arc<ReplicaShared>) {
    let mut interval = tokio::time::interval(TICK_EVERY);
    let mut leading = false;
    loop {
        interval.tick().await;
        let now_leading = shared.is_leader();
        if now_leading && !leading {
            info!(replica = shared.id, "took over as lock-service leader");
        }
        leading = now_leading;
        if leading {
            // Entries of earlier terms are applied before this tick commits,
            // so what is pending afterwards is up to date.
            shared.propose(LockCommand::Tick { now: micros_since_epoch() }).await;
            let pending = shared.machine.0.lock().core.fences_pending();
            for epoch in pending {
                shared.fence(epoch);
            }
        }
    }
}
