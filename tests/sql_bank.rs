//! Bank transfers through the whole stack: tokio-postgres clients, the
//! pgwire server, the SQL engine, the B-tree engine and the Aurora volume
//! on six loopback storage nodes.
//!
//! Eight clients move money between accounts in transactions, and log
//! each transfer in a table. During the load two storage nodes are killed
//! (writes go on at 4 of 6), then the front end crashes (its volume client
//! stops mid-transaction, no clean shutdown) and a new one recovers the
//! volume with the two nodes still down. Afterwards the total balance is
//! what it was, every acknowledged transfer is in the log exactly once,
//! and every account's balance is its opening balance plus the transfers
//! the log holds (so none is applied twice or half).

use common::transport::TcpTransport;
use db_frontend::engine::AuroraKv;
use db_frontend::sql::server::{self, ServerConfig, ServerHandle};
use lab::cluster::{ClusterOptions, LocalCluster};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use storage_node::DiskBackend;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::NoTls;

const ACCOUNTS: i64 = 50;
const OPENING_BALANCE: i64 = 1000;
const CLIENTS: u64 = 8;
/// Every test finishes well inside this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// A statement that takes longer than this fails the transfer.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each phase of the load.
const PHASE: Duration = Duration::from_millis(1500);

async fn serve(cluster: &LocalCluster) -> (Arc<db_frontend::VolumeClient>, ServerHandle) {
    let volume = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await.expect("volume"));
    let (store, _) = AuroraKv::open(volume.clone(), 256).await.expect("engine");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    (volume, server::spawn(listener, store, ServerConfig::trust()).expect("server"))
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let url = format!("host=127.0.0.1 port={port} user=bank dbname=bank");
    let (client, driver) =
        tokio::time::timeout(STATEMENT_TIMEOUT, tokio_postgres::connect(&url, NoTls)).await.ok()?.ok()?;
    tokio::spawn(driver);
    Some(client)
}

/// One transfer; `Ok(true)` once its COMMIT is acknowledged.
async fn transfer(client: &tokio_postgres::Client, id: i64, from: i64, to: i64, amount: i64) -> Result<bool, String> {
    let script = format!(
        "BEGIN; \
         UPDATE accounts SET balance = balance - {amount} WHERE id = {from}; \
         UPDATE accounts SET balance = balance + {amount} WHERE id = {to}; \
         INSERT INTO transfers (id, source, target, amount) VALUES ({id}, {from}, {to}, {amount}); \
         COMMIT"
    );
    match tokio::time::timeout(STATEMENT_TIMEOUT, client.batch_execute(&script)).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_two_dead_nodes_and_a_front_end_crash() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut options = ClusterOptions::new(directory.path(), DiskBackend::Std);
        options.pg_bytes = 4096 * 8192;
        options.log_file_bytes = 4 * 1024 * 1024;
        let mut cluster = LocalCluster::start(&options).await.expect("cluster");
        let (volume, handle) = serve(&cluster).await;
        let setup = connect(handle.address.port()).await.expect("connect");
        setup
            .batch_execute(
                "CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT); \
                 CREATE TABLE transfers (id BIGINT PRIMARY KEY, source BIGINT, target BIGINT, amount BIGINT)",
            )
            .await
            .expect("schema");
        let rows: Vec<String> = (0..ACCOUNTS).map(|id| format!("({id}, {OPENING_BALANCE})")).collect();
        setup.batch_execute(&format!("INSERT INTO accounts VALUES {}", rows.join(", "))).await.expect("accounts");
        drop(setup);

        let (port_sender, port) = watch::channel(handle.address.port());
        let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for client_index in 0..CLIENTS {
            let (mut port, acknowledged, stop) = (port.clone(), acknowledged.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let mut rng = common::rng::SimRng::new(client_index + 1);
                let mut sequence = 0i64;
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let current = *port.borrow_and_update();
                    let Some(client) = connect(current).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        sequence += 1;
                        let id = client_index as i64 * 1_000_000 + sequence;
                        let (from, to) = (rng.below(ACCOUNTS as u64) as i64, rng.below(ACCOUNTS as u64) as i64);
                        if from == to {
                            continue;
                        }
                        match transfer(&client, id, from, to, rng.below(50) as i64 + 1).await {
                            Ok(_) => {
                                acknowledged.lock().insert(id);
                            }
                            Err(_) => {
                                errors += 1;
                                break; // reconnect (the front end may have changed)
                            }
                        }
                    }
                }
                errors
            }));
        }

        tokio::time::sleep(PHASE).await;
        let before_kill = acknowledged.lock().len();
        eprintln!("phase: {before_kill} transfers; killing two nodes");
        cluster.kill(1);
        cluster.kill(3);
        tokio::time::sleep(PHASE).await;
        let before_crash = acknowledged.lock().len();
        assert!(before_crash > before_kill, "transfers stopped with two nodes down");
        // The front end crashes: no clean shutdown of its volume client.
        eprintln!("phase: {before_crash} transfers; the front end crashes");
        volume.close();
        handle.stop().await.expect("stop the old server");
        eprintln!("phase: the old server stopped");
        let (volume, handle) = serve(&cluster).await;
        eprintln!("phase: a new front end serves");
        port_sender.send(handle.address.port()).expect("clients listen");
        tokio::time::sleep(PHASE).await;
        stop.store(true, Ordering::Relaxed);
        let mut errors = 0;
        for client in clients {
            errors += client.await.expect("client");
        }
        let acknowledged = acknowledged.lock().clone();
        assert!(acknowledged.len() > before_crash, "no transfer after the new front end opened");
        assert!(errors >= 1, "the crash cut at least one transfer short");

        // Verify through a fresh connection to the new front end.
        let check = connect(handle.address.port()).await.expect("connect");
        let balances: BTreeMap<i64, i64> = check
            .query("SELECT id, balance FROM accounts", &[])
            .await
            .expect("balances")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let logged = check.query("SELECT id, source, target, amount FROM transfers", &[]).await.expect("transfers");
        let total: i64 = balances.values().sum();
        assert_eq!(total, ACCOUNTS * OPENING_BALANCE, "the total balance changed");
        let mut expected: BTreeMap<i64, i64> = (0..ACCOUNTS).map(|id| (id, OPENING_BALANCE)).collect();
        let mut logged_ids = BTreeSet::new();
        for row in &logged {
            let (id, source, target, amount): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
            assert!(logged_ids.insert(id), "transfer {id} logged twice");
            *expected.get_mut(&source).expect("an account") -= amount;
            *expected.get_mut(&target).expect("an account") += amount;
        }
        let lost: Vec<&i64> = acknowledged.difference(&logged_ids).collect();
        assert!(lost.is_empty(), "{} acknowledged transfers lost, e.g. {:?}", lost.len(), lost.first());
        assert_eq!(balances, expected, "balances are not the opening balances plus the logged transfers");
        eprintln!(
            "{} transfers acknowledged ({before_kill} before the kill, {before_crash} before the crash), {} logged, {errors} cut short",
            acknowledged.len(),
            logged_ids.len()
        );
        drop(check);
        handle.stop().await.expect("stop");
        volume.close();
        cluster.restart(1).await.expect("restart node 1");
        cluster.restart(3).await.expect("restart node 3");
        cluster.stop();
    })
    .await
    .expect("test timed out");
}
