//! An in-process cluster: six storage nodes on loopback TCP, two in each of
//! three AZs, each with its own data directory, and the volume geometry
//! that places every PG on them; optionally a block volume too, with one
//! replica of each of its PGs on every node.
//!
//! A node can be killed (its tasks are aborted: nothing more is
//! acknowledged, whatever reached fdatasync stays) and restarted on the same
//! address from the same directory, which is what the crash tests and the
//! demo need. A node can also be started with a user-space delay on every
//! frame it sends, which delays its acknowledgements (`--slow-nodes`).

use anyhow::{Context, Result, bail};
use common::ids::{AzId, NodeId, PgId};
use common::limits::BLOCK_BYTES_MAX;
use common::transport::{MemoryNetwork, TcpTransport, Transport};
use db_frontend::volume::client::{VolumeClient, VolumeConfig};
use db_frontend::volume::geometry::{
    ClusterConfig, NodeSpec, PAGE_BYTES_DEFAULT, PG_BYTES_DEFAULT, SegmentPlacement, VolumeGeometry,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use storage_node::block_client::{BlockClient, BlockVolumeLayout, REPLICAS};
use storage_node::block_segment::BlockSegmentConfig;
use storage_node::disk::MemoryVolumeStore;
use storage_node::{DiskBackend, NodeConfig, SegmentConfig, StorageNode};

/// Nodes in the cluster: two per AZ.
pub const NODE_COUNT: usize = 6;
const AZ_COUNT: u32 = 3;
/// How long a restart keeps trying to rebind the node's old port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// The shape of a local cluster and its volume.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub data_directory: PathBuf,
    pub disk: DiskBackend,
    pub pg_count: u32,
    pub pg_bytes: u64,
    pub page_bytes: usize,
    /// Size of each preallocated segment log file.
    pub log_file_bytes: u64,
    /// Delay on every frame node `i` sends (its acknowledgements).
    pub send_delays: Vec<(usize, Duration)>,
    /// Run the nodes on this simulated network (with its faults) instead of
    /// loopback TCP; node `i` listens at `node-i`. `send_delays` is ignored.
    pub memory_network: Option<MemoryNetwork>,
    /// PGs of a block volume (the file system's shared disk) beside the
    /// redo volume; 0 for none. Node `i` hosts replica `i` of each.
    pub block_pgs: u32,
    pub blocks_per_pg: u64,
    /// Nodes started beyond the six with no segment, to replace one by
    /// (node `6 + i` is in AZ `(6 + i) % 3`).
    pub spares: usize,
}

impl ClusterOptions {
    pub fn new(data_directory: &Path, disk: DiskBackend) -> Self {
        ClusterOptions {
            data_directory: data_directory.to_path_buf(),
            disk,
            pg_count: 1,
            pg_bytes: PG_BYTES_DEFAULT,
            page_bytes: PAGE_BYTES_DEFAULT,
            log_file_bytes: 32 * 1024 * 1024,
            send_delays: Vec::new(),
            memory_network: None,
            block_pgs: 0,
            blocks_per_pg: 1 << 20,
            spares: 0,
        }
    }
}

#[derive(Debug)]
struct NodeSlot {
    config: NodeConfig,
    transport: Arc<dyn Transport>,
    running: Option<StorageNode>,
}

/// Six running (or killed) storage nodes and the geometry over them, and
/// any spare nodes.
#[derive(Debug)]
pub struct LocalCluster {
    slots: Vec<NodeSlot>,
    geometry: VolumeGeometry,
    memory_network: Option<MemoryNetwork>,
    block_layout: Option<BlockVolumeLayout>,
}

impl LocalCluster {
    /// Starts six nodes, each hosting a segment of every PG, and the spares.
    pub async fn start(options: &ClusterOptions) -> Result<LocalCluster> {
        let memory_store = MemoryVolumeStore::default();
        let node_count = NODE_COUNT + options.spares;
        let mut slots = Vec::with_capacity(node_count);
        let mut specs = Vec::with_capacity(NODE_COUNT);
        // Bind every node first so the geometry can name real addresses.
        for index in 0..node_count {
            let node = NodeId(index as u32);
            let delay = options.send_delays.iter().find(|(slow, _)| *slow == index).map(|(_, delay)| *delay);
            let (transport, listen_address): (Arc<dyn Transport>, String) = match (&options.memory_network, delay) {
                (Some(network), _) => (Arc::new(network.clone()), format!("node-{index}")),
                (None, Some(delay)) => (Arc::new(TcpTransport::with_send_delay(delay)), "127.0.0.1:0".into()),
                (None, None) => (Arc::new(TcpTransport::new()), "127.0.0.1:0".into()),
            };
            let config = NodeConfig {
                node,
                listen_address,
                data_directory: options.data_directory.join(format!("node-{index}")),
                disk: options.disk,
                memory_store: memory_store.clone(),
                segments: Vec::new(),
                block_segments: Vec::new(),
                peers: BTreeMap::new(),
                new_segment_log_file_bytes: options.log_file_bytes,
            };
            if index < NODE_COUNT {
                specs.push(NodeSpec { id: node, az: Self::az_of(index), address: String::new() });
            }
            slots.push(NodeSlot { config, transport, running: None });
        }
        // Placement only needs ids and AZs; addresses are filled in once bound.
        let mut geometry = VolumeGeometry::place(
            &ClusterConfig { nodes: specs },
            options.pg_count,
            options.pg_bytes,
            options.page_bytes,
        )
        .map_err(anyhow::Error::msg)?;
        let pages_per_pg = geometry.pages_per_pg();
        for (index, slot) in slots.iter_mut().enumerate() {
            slot.config.segments = geometry
                .segments_on(NodeId(index as u32))
                .into_iter()
                .map(|(pg, _)| {
                    let mut segment = SegmentConfig::new(pg, options.page_bytes, pages_per_pg);
                    segment.log_file_bytes = options.log_file_bytes;
                    segment
                })
                .collect();
            let block_pgs = if index < NODE_COUNT { options.block_pgs } else { 0 };
            slot.config.block_segments = (0..block_pgs)
                .map(|pg| BlockSegmentConfig {
                    log_file_bytes: options.log_file_bytes,
                    ..BlockSegmentConfig::new(PgId(pg), options.blocks_per_pg, BLOCK_BYTES_MAX)
                })
                .collect();
            let node = StorageNode::start(slot.config.clone(), slot.transport.clone())
                .await
                .with_context(|| format!("starting node {index}"))?;
            slot.config.listen_address = node.local_address().to_string();
            slot.running = Some(node);
        }
        for placement in geometry.segments.iter_mut().flatten() {
            placement.address = slots[placement.node.0 as usize].config.listen_address.clone();
        }
        // Each segment gossips with the other five of its PG.
        for (index, slot) in slots.iter_mut().enumerate() {
            slot.config.peers = geometry.peers_of(NodeId(index as u32));
            let node = slot.running.as_ref().expect("started above");
            for (pg, addresses) in &slot.config.peers {
                node.set_peers(*pg, addresses.clone());
            }
        }
        let block_layout = (options.block_pgs > 0).then(|| {
            let replicas: [String; REPLICAS] = std::array::from_fn(|index| slots[index].config.listen_address.clone());
            BlockVolumeLayout {
                blocks_per_pg: options.blocks_per_pg,
                block_bytes_max: BLOCK_BYTES_MAX,
                pgs: vec![replicas; options.block_pgs as usize],
            }
        });
        Ok(LocalCluster { slots, geometry, memory_network: options.memory_network.clone(), block_layout })
    }

    /// A client of the block volume (if the cluster has one).
    pub fn block_client(&self, transport: Arc<dyn Transport>) -> Result<BlockClient> {
        let layout = self.block_layout.clone().context("this cluster was started without a block volume")?;
        Ok(BlockClient::new(layout, transport))
    }

    pub fn geometry(&self) -> &VolumeGeometry {
        &self.geometry
    }

    /// The AZ of node `index`.
    pub fn az_of(index: usize) -> AzId {
        AzId((index as u32 % AZ_COUNT) as u8)
    }

    /// Where node `index` (one of the six or a spare) sits, as a geometry
    /// names a segment's place.
    pub fn placement(&self, index: usize) -> SegmentPlacement {
        SegmentPlacement {
            node: NodeId(index as u32),
            az: Self::az_of(index),
            address: self.address(index).to_string(),
        }
    }

    pub fn address(&self, index: usize) -> &str {
        &self.slots[index].config.listen_address
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.slots[index].running.is_some()
    }

    pub fn node(&self, index: usize) -> Option<&StorageNode> {
        self.slots[index].running.as_ref()
    }

    /// Opens a volume client over loopback TCP.
    pub async fn open_volume(&self, transport: Arc<dyn Transport>) -> Result<VolumeClient> {
        Ok(VolumeClient::open(VolumeConfig::new(self.geometry.clone()), transport).await?)
    }

    /// Kills node `index` as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(node) = self.slots[index].running.take() {
            node.stop();
            if let Some(network) = &self.memory_network {
                network.unbind(node.local_address());
            }
        }
    }

    /// Restarts a killed node on its old address from its old data.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        if self.slots[index].running.is_some() {
            bail!("node {index} is already running");
        }
        let slot = &mut self.slots[index];
        let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
        loop {
            // The killed node's listener closes asynchronously; retry the bind.
            match StorageNode::start(slot.config.clone(), slot.transport.clone()).await {
                Ok(node) => {
                    slot.running = Some(node);
                    return Ok(());
                }
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, index, "restart: retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(error).with_context(|| format!("restarting node {index}")),
            }
        }
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        for index in 0..self.slots.len() {
            self.kill(index);
        }
    }

    /// SCL of `pg`'s segment on node `index`, if it runs.
    pub fn segment_complete_lsn(&self, index: usize, pg: PgId) -> Option<common::ids::Lsn> {
        self.node(index).and_then(|node| node.segment_status(pg)).map(|status| status.segment_complete_lsn)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
