//! Sealing the volume at a new epoch: the fencing step of a writer's crash
//! recovery (A17 §4.3: "changes the locks on the door").
//!
//! Every segment of every PG is asked to move to the new epoch
//! ([`SealEpochRequest`]). A segment refuses the older epoch from then on
//! and answers, once the new epoch is durable in its log, with its status
//! (SCL included). The seal holds once a write quorum (4 of 6) of every PG
//! answered: an older writer can then make nothing more durable, because
//! any 4 segments it reaches include one that refuses it; and the answers
//! carry a read quorum of SCLs (any 4 include 3) for recovery to start
//! from. Sealing does not wait for the other segments: they stay at the
//! old epoch, refusing the old writer's requests as well as the new one's
//! (`UnknownEpoch`), until they are sealed too. The writer that starts at
//! the new epoch (not built yet) must seal them as it connects.

use common::ids::{Epoch, NodeId, PgId, ReplicaIndex};
use common::message::{ErrorCode, Message, SealEpochRequest, SegmentStatus};
use common::transport::Transport;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::{VolumeConfig, VolumeError};
use super::geometry::WRITE_QUORUM;

/// How often a node's unanswered seals are sent again.
const SEAL_RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Wait between reconnection attempts to a node.
const RECONNECT_WAIT: Duration = Duration::from_millis(50);

/// One segment's answer to the seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedSegment {
    pub replica: ReplicaIndex,
    pub node: NodeId,
    pub status: SegmentStatus,
}

/// The segments of one PG that answered (at least a write quorum).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedPg {
    pub pg: PgId,
    pub segments: Vec<SealedSegment>,
}

/// What a node's task reports.
enum Answer {
    Sealed(PgId, NodeId, SegmentStatus),
    Refused(PgId, NodeId, ErrorCode, String),
}

/// Seals every PG of the volume at `epoch` (above every epoch a writer
/// used) on a write quorum; returns each PG's answers. Fails if a segment
/// is already at a newer epoch (another recovery won), or if some PG has
/// no write quorum within `config.open_timeout`.
pub async fn seal_volume(
    config: &VolumeConfig,
    transport: Arc<dyn Transport>,
    epoch: Epoch,
) -> Result<Vec<SealedPg>, VolumeError> {
    let geometry = &config.geometry;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for (node, address) in geometry.nodes() {
        let hosted: Vec<PgId> = geometry.segments_on(node).into_iter().map(|(pg, _)| pg).collect();
        let (transport, answers) = (transport.clone(), answers.clone());
        tasks.spawn(seal_node(transport, node, address, hosted, epoch, answers));
    }
    drop(answers);
    let replicas: HashMap<(PgId, NodeId), ReplicaIndex> = geometry
        .nodes()
        .into_keys()
        .flat_map(|node| geometry.segments_on(node).into_iter().map(move |(pg, replica)| ((pg, node), replica)))
        .collect();
    let mut sealed: BTreeMap<PgId, Vec<SealedSegment>> =
        (0..geometry.pg_count()).map(|pg| (PgId(pg), Vec::new())).collect();
    let deadline = Instant::now() + config.open_timeout;
    loop {
        if let Some((pg, segments)) = sealed.iter().find(|(_, segments)| segments.len() < WRITE_QUORUM) {
            let (pg, count) = (*pg, segments.len());
            let answer = match tokio::time::timeout_at(deadline, answered.recv()).await {
                Ok(Some(answer)) => answer,
                Ok(None) | Err(_) => {
                    return Err(VolumeError::NoWriteQuorum { pg, sealed: count, waited: config.open_timeout });
                }
            };
            match answer {
                Answer::Sealed(pg, node, status) if status.epoch == epoch => {
                    let segments = sealed.entry(pg).or_default();
                    if !segments.iter().any(|segment| segment.node == node) {
                        let replica = replicas[&(pg, node)];
                        segments.push(SealedSegment { replica, node, status });
                    }
                }
                Answer::Sealed(pg, node, status) => {
                    let reason = format!("the segment is at {}, past {epoch}", status.epoch);
                    return Err(VolumeError::SealRefused { pg, node, reason });
                }
                Answer::Refused(pg, node, ErrorCode::StaleEpoch, message) => {
                    return Err(VolumeError::SealRefused { pg, node, reason: message });
                }
                Answer::Refused(pg, node, code, message) => {
                    // This segment cannot take the seal (a failed disk, not
                    // hosted): the others may still make a quorum.
                    warn!(%pg, %node, ?code, message, "a segment refused the seal");
                }
            }
        } else {
            tasks.abort_all();
            info!(%epoch, pgs = sealed.len(), "volume sealed");
            return Ok(sealed.into_iter().map(|(pg, segments)| SealedPg { pg, segments }).collect());
        }
    }
}

/// Seals the segments `hosted` on `node`, reconnecting until aborted.
async fn seal_node(
    transport: Arc<dyn Transport>,
    node: NodeId,
    address: String,
    hosted: Vec<PgId>,
    epoch: Epoch,
    answers: mpsc::UnboundedSender<Answer>,
) {
    let mut unanswered: BTreeMap<u64, PgId> = hosted.iter().enumerate().map(|(id, pg)| (id as u64 + 1, *pg)).collect();
    while !unanswered.is_empty() {
        let mut connection = match transport.connect(address.clone()).await {
            Ok(connection) => connection,
            Err(error) => {
                debug!(%node, %error, "seal: connect failed");
                tokio::time::sleep(RECONNECT_WAIT).await;
                continue;
            }
        };
        let mut resend = tokio::time::interval(SEAL_RETRY_INTERVAL);
        loop {
            tokio::select! {
                _ = resend.tick() => {
                    for (request_id, pg) in &unanswered {
                        let request = SealEpochRequest { request_id: *request_id, pg: *pg, epoch };
                        if connection.sender.try_send(Message::SealEpoch(request).encode()).is_err() {
                            break;
                        }
                    }
                }
                frame = connection.receiver.recv() => {
                    let Some(Ok(frame)) = frame else { break };
                    let answer = match Message::decode(&frame) {
                        Ok(Message::Status(status)) => unanswered
                            .remove(&status.request_id)
                            .map(|pg| Answer::Sealed(pg, node, status)),
                        Ok(Message::Error(error)) => unanswered
                            .remove(&error.request_id)
                            .map(|pg| Answer::Refused(pg, node, error.code, error.message)),
                        _ => None,
                    };
                    if let Some(answer) = answer
                        && answers.send(answer).is_err()
                    {
                        return;
                    }
                    if unanswered.is_empty() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_WAIT).await;
    }
}
