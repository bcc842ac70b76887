//! The block volume on a real cluster: six storage nodes on loopback TCP
//! with std files and fdatasync. Every acknowledged block write survives
//! any two nodes being killed, their restart, two others being killed, and
//! a crash and restart of the whole cluster.

use bytes::Bytes;
use common::ids::BlockId;
use common::transport::TcpTransport;
use lab::cluster::{ClusterOptions, LocalCluster, NODE_COUNT};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use storage_node::DiskBackend;
use storage_node::block_client::BlockClient;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const BLOCKS_PER_PG: u64 = 64;
const BLOCKS: u64 = 2 * BLOCKS_PER_PG;
/// The writer's lease epoch and fencing token (no lock service here).
const EPOCH: u64 = 1;
const TOKEN: u64 = 1;

fn data(block: u64, version: u64) -> Bytes {
    // Sizes from a few bytes up to a whole 64 KiB block.
    let length = ((block * 997 + version * 131) % 65_536) as usize + 1;
    Bytes::from(vec![(block + version) as u8; length])
}

async fn write_all(client: &BlockClient, version: u64, model: &mut BTreeMap<u64, u64>) {
    for block in 0..BLOCKS {
        client.write(BlockId(block), version, EPOCH, TOKEN, data(block, version)).await.expect("a quorum write");
        model.insert(block, version);
    }
}

async fn check_all(client: &BlockClient, model: &BTreeMap<u64, u64>, when: &str) {
    for (block, version) in model {
        let read = client.read(BlockId(*block)).await.unwrap_or_else(|error| panic!("{when}: block {block}: {error}"));
        assert_eq!(read.version, *version, "{when}: block {block}");
        assert_eq!(read.data, data(*block, *version), "{when}: block {block}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_block_writes_survive_node_kills_and_a_full_restart() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut options = ClusterOptions::new(directory.path(), DiskBackend::Std);
        options.block_pgs = 2;
        options.blocks_per_pg = BLOCKS_PER_PG;
        options.log_file_bytes = 1024 * 1024;
        let mut cluster = LocalCluster::start(&options).await.expect("cluster");
        let mut client = cluster.block_client(Arc::new(TcpTransport::new())).expect("a block volume");
        client.timeout = Duration::from_secs(10);
        let mut model = BTreeMap::new();
        write_all(&client, 1, &mut model).await;

        cluster.kill(0);
        cluster.kill(3);
        check_all(&client, &model, "two nodes down").await;
        write_all(&client, 2, &mut model).await;
        cluster.restart(0).await.expect("restart");
        cluster.restart(3).await.expect("restart");
        cluster.kill(1);
        cluster.kill(5);
        check_all(&client, &model, "two other nodes down").await;

        for index in 0..NODE_COUNT {
            cluster.kill(index);
        }
        for index in 0..NODE_COUNT {
            cluster.restart(index).await.expect("restart after a full crash");
        }
        check_all(&client, &model, "after a full crash").await;
        cluster.stop();
    })
    .await
    .expect("in time");
}
