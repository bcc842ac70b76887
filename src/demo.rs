//! `lab demo`: a guided tour of the storage layer in under a minute.
//!
//! 1. Start six storage nodes (two per AZ, three AZs) on loopback TCP, each
//!    with its own data directory under a temp dir, and open a volume.
//! 2. Run a 5-second quorum-write load and print its latency.
//! 3. Kill two nodes in different AZs; show that commits go on (4 of 6).
//! 4. Restart them from their logs; show that the writer re-sends what they
//!    missed and their SCLs catch up with the volume.
//! 5. Read back pages written before, during and after the failure and check
//!    them against what was acknowledged.
//! 6. Crash the writer mid-load; a new one recovers the volume (seal,
//!    fetch the tail, truncate above VDL) and every acknowledged commit is
//!    still there.
//! 7. Frangipani: two workstations on a block volume; a file written in one
//!    is read in the other; the first is killed holding dirty locks, the
//!    second waits out its lease, replays its log, and fsck finds the
//!    volume clean.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::ids::{Lsn, PageId, PgId};
use common::redo::PageOp;
use common::transport::TcpTransport;
use db_frontend::volume::writer::PageChange;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage_node::DiskBackend;

use crate::bench::quorum_write::run_load;
use crate::bench::report::{LatencySummary, render_table};
use crate::cluster::{ClusterOptions, LocalCluster, NODE_COUNT};

/// Options of `lab demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Seconds of the opening quorum-write load.
    #[arg(long, default_value_t = 5.0)]
    pub bench_seconds: f64,
    /// Concurrent writers during the load.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// File backend of the nodes: std or io-uring.
    #[arg(long, default_value = "std")]
    pub backend: DiskBackend,
}

/// How long restarted nodes get to catch up before the demo fails.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pages the verification writes: marker records checked after the failure.
const MARKER_PAGES: u64 = 64;

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn segment_table(cluster: &LocalCluster, volume_complete: Lsn) -> String {
    let rows = (0..NODE_COUNT)
        .map(|index| {
            let scl = cluster.segment_complete_lsn(index, PgId(0));
            vec![
                format!("node {index}"),
                LocalCluster::az_of(index).to_string(),
                if cluster.is_running(index) { "up".into() } else { "killed".into() },
                scl.map_or("-".into(), |scl| scl.0.to_string()),
                scl.map_or("-".into(), |scl| (volume_complete.0.saturating_sub(scl.0)).to_string()),
            ]
        })
        .collect::<Vec<_>>();
    render_table(&["node", "AZ", "state", "SCL (PG 0)", "behind VCL"], &rows)
}

/// Writes marker `round` to each marker page; returns what was acknowledged.
async fn write_markers(
    client: &db_frontend::VolumeClient,
    round: u8,
    acknowledged: &mut BTreeMap<u64, u8>,
) -> Result<()> {
    for page in 0..MARKER_PAGES {
        let data = Bytes::from(vec![round; 32]);
        let change = PageChange { page: PageId(page), op: PageOp::Write { offset: 0, data } };
        client.commit(&[change]).await.with_context(|| format!("committing marker {round} to page {page}"))?;
        acknowledged.insert(page, round);
    }
    Ok(())
}

pub async fn run(options: DemoOptions) -> Result<()> {
    let started = Instant::now();
    let directory = tempfile::Builder::new().prefix("lab-demo-").tempdir()?;
    println!("== 1. Six storage nodes on loopback, two per AZ, data in {}", directory.path().display());
    let mut cluster = LocalCluster::start(&ClusterOptions::new(directory.path(), options.backend)).await?;
    let client = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await?);
    let geometry = cluster.geometry();
    println!(
        "   volume: {} PG of {} GiB, {}-byte pages; PG 0 on nodes {}",
        geometry.pg_count(),
        geometry.pg_bytes >> 30,
        geometry.page_bytes,
        (0..NODE_COUNT).map(|index| cluster.address(index).to_string()).collect::<Vec<_>>().join(" ")
    );
    let mut acknowledged = BTreeMap::new();
    write_markers(&client, 1, &mut acknowledged).await?;

    println!("\n== 2. Quorum-write load: {} writers for {} s", options.writers, options.bench_seconds);
    let bar = ProgressBar::new((options.bench_seconds * 1000.0) as u64);
    bar.set_style(ProgressStyle::with_template("   [{bar:30}] {msg}").expect("valid template").progress_chars("=> "));
    let load =
        run_load(&client, options.writers, 128, Duration::from_secs_f64(options.bench_seconds), Some(&bar), 1).await?;
    bar.finish_and_clear();
    let summary = LatencySummary::of(&load.latency);
    println!(
        "{}",
        render_table(
            &["commits", "commits/s", "p50 µs", "p90 µs", "p99 µs", "max µs"],
            &[vec![
                load.commits.to_string(),
                format!("{:.0}", load.commits as f64 / load.elapsed.as_secs_f64()),
                summary.p50_us.to_string(),
                summary.p90_us.to_string(),
                summary.p99_us.to_string(),
                summary.max_us.to_string(),
            ]]
        )
    );
    ensure!(load.commits > 0, "no commit completed during the load");

    let (first, second) = (0, 4); // AZ 0 and AZ 1
    println!(
        "\n== 3. Killing node {first} ({}) and node {second} ({})",
        LocalCluster::az_of(first),
        LocalCluster::az_of(second)
    );
    cluster.kill(first);
    cluster.kill(second);
    let during = run_load(&client, options.writers, 128, Duration::from_secs(2), None, 2).await?;
    write_markers(&client, 2, &mut acknowledged).await?;
    println!(
        "   with two nodes down: {} commits in 2 s ({:.0}/s), p50 {} µs — 4 of 6 is still a write quorum",
        during.commits,
        during.commits as f64 / during.elapsed.as_secs_f64(),
        LatencySummary::of(&during.latency).p50_us
    );
    ensure!(during.commits > 0, "writes stopped with only two nodes down");
    println!(
        "   the writer keeps {} KiB of records the two dead segments have not acknowledged, to resend later",
        client.retained_bytes() / 1024
    );
    let points = client.points();
    println!("{}", segment_table(&cluster, points.volume_complete));

    println!("\n== 4. Restarting nodes {first} and {second} from their logs");
    cluster.restart(first).await?;
    cluster.restart(second).await?;
    for index in [first, second] {
        if let Some(report) = cluster.node(index).and_then(|node| node.recovery.get(&PgId(0))) {
            println!(
                "   node {index}: recovered {} records, SCL {}, torn tail {} bytes, mid-log corruptions {}",
                report.records, report.segment_complete_lsn, report.truncated_tail_bytes, report.mid_log_corruptions
            );
        }
    }
    let catching_up = spinner("writer re-sends what they missed; waiting for their SCLs to reach VCL");
    let target = client.points().volume_complete;
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    let caught_up_in = loop {
        let behind = [first, second]
            .iter()
            .any(|index| cluster.segment_complete_lsn(*index, PgId(0)).is_none_or(|scl| scl < target));
        if !behind {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            catching_up.finish_and_clear();
            println!("{}", segment_table(&cluster, target));
            bail!("restarted nodes did not catch up to {target} within {CATCH_UP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    catching_up.finish_and_clear();
    println!("   caught up with VCL {target} at t = {:.1} s", caught_up_in.as_secs_f64());
    write_markers(&client, 3, &mut acknowledged).await?;
    println!("{}", segment_table(&cluster, client.points().volume_complete));

    println!("\n== 5. Reading back {MARKER_PAGES} marker pages at VDL {}", client.points().volume_durable);
    let mut served_by = BTreeMap::new();
    for (page, round) in &acknowledged {
        let read = client.read_page(PageId(*page)).await?;
        ensure!(
            read.image[..32].iter().all(|byte| byte == round),
            "page {page}: expected marker {round}, read {:?}",
            &read.image[..32]
        );
        *served_by.entry(read.served_by).or_insert(0) += 1;
    }
    let spread: Vec<String> = served_by.iter().map(|(node, count)| format!("{node}: {count}")).collect();
    println!("   every page holds its last acknowledged marker (reads served by {})", spread.join(", "));
    let client = Arc::into_inner(client).context("the load tasks still hold the writer")?;
    frontend_crash(&cluster, client, options.writers as u32).await?;
    cluster.stop();
    frangipani_section(options.backend).await?;
    sql_section(options.backend).await?;
    println!("\ndemo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Marks the front-end crash step's values (the earlier random load may have
/// written anything to the same pages).
const CRASH_MAGIC: [u8; 8] = *b"fe-crash";

/// Step 6: the writer crashes in the middle of a load (its tasks stop, no
/// goodbye) and a new one recovers the volume: how long until it accepts
/// writes, what it found, and every acknowledged commit still there.
async fn frontend_crash(cluster: &LocalCluster, client: db_frontend::VolumeClient, writers: u32) -> Result<()> {
    println!("\n== 6. Front-end crash: the writer dies mid-load and a new one recovers the volume");
    let client = Arc::new(client);
    let old_epoch = client.epoch();
    // Committer `w` writes 1, 2, 3, ... to page FIRST_LOAD_PAGE + w and
    // notes each value once its commit returned.
    const FIRST_LOAD_PAGE: u64 = MARKER_PAGES;
    let acked: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..writers).map(|_| std::sync::atomic::AtomicU64::new(0)).collect());
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let (client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                for value in 1u64.. {
                    let data = Bytes::from([CRASH_MAGIC.as_slice(), &value.to_le_bytes()].concat());
                    let page = PageId(FIRST_LOAD_PAGE + u64::from(writer));
                    if client.commit(&[PageChange { page, op: PageOp::Write { offset: 0, data } }]).await.is_err() {
                        return;
                    }
                    acked[writer as usize].store(value, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.close(); // the crash: commits in flight fail, nothing more is sent
    for task in tasks {
        task.await?;
    }
    let acked: Vec<u64> = acked.iter().map(|value| value.load(std::sync::atomic::Ordering::Relaxed)).collect();
    println!(
        "   writer at {old_epoch} stopped after {} acknowledged commits, with commits in flight",
        acked.iter().sum::<u64>()
    );
    let recovering = Instant::now();
    let recovered = cluster.open_volume(Arc::new(TcpTransport::new())).await?;
    let open_ms = recovering.elapsed().as_secs_f64() * 1000.0;
    let points = recovered.points();
    println!(
        "   new writer at {} accepts writes {open_ms:.1} ms after it started: it sealed a write quorum of \
         every PG, found VDL {}, and truncated everything above it",
        recovered.epoch(),
        points.volume_durable
    );
    for (writer, last) in acked.iter().enumerate() {
        let read = recovered.read_page(PageId(FIRST_LOAD_PAGE + writer as u64)).await?;
        let value = (read.image[..8] == CRASH_MAGIC)
            .then(|| u64::from_le_bytes(read.image[8..16].try_into().expect("8 bytes")));
        // The last acknowledged value, or the one commit in flight at the
        // crash; a page never acknowledged may hold the earlier load's bytes.
        let held = match value {
            Some(value) => *last <= value && value <= last + 1,
            None => *last == 0,
        };
        ensure!(held, "page {}: last acknowledged {last}, recovered {value:?}", FIRST_LOAD_PAGE + writer as u64);
    }
    let data = Bytes::from_static(b"after recovery");
    recovered.commit(&[PageChange { page: PageId(FIRST_LOAD_PAGE), op: PageOp::Write { offset: 0, data } }]).await?;
    println!(
        "   all {} acknowledged commits are there (each page holds its last acknowledged value or the one in flight), \
         and the new writer commits",
        acked.iter().sum::<u64>()
    );
    recovered.close();
    Ok(())
}

/// Lease of the demo's workstations: a killed one's locks come back this soon.
const DEMO_LEASE_MS: u64 = 1000;

/// Step 7: two Frangipani workstations on a block volume (coherence, a
/// kill while holding dirty locks, recovery, fsck).
async fn frangipani_section(backend: DiskBackend) -> Result<()> {
    use frangipani::fs::ROOT_INODE;
    use frangipani::inode::Kind;
    println!("\n== 7. Frangipani: two workstations on a block volume of the same kind of cluster");
    let server = crate::fs::FsServer::start(None, backend, DEMO_LEASE_MS).await?;
    let first = crate::fs::mount_workstation(&server.volume, 0).await?;
    let second = crate::fs::mount_workstation(&server.volume, 1).await?;
    let file = first.create(ROOT_INODE, b"hello.txt", Kind::File, 0o644, (0, 0), None).await?.ino;
    first.write(file, 0, b"written by workstation 0").await?;
    let read = second.read(file, 0, 100).await?;
    ensure!(read == b"written by workstation 0", "workstation 1 read {read:?}");
    println!(
        "   workstation 0 wrote hello.txt; workstation 1 read {:?} at once (revokes served by workstation 0, which wrote it back first: {})",
        String::from_utf8_lossy(&read),
        first.stats().lock.flushes
    );
    let directory = first.create(ROOT_INODE, b"work", Kind::Directory, 0o755, (0, 0), None).await?.ino;
    for index in 0..20 {
        first.create(directory, format!("file-{index}").as_bytes(), Kind::File, 0o644, (0, 0), None).await?;
    }
    first.flush_log().await?;
    let dirty = first.stats();
    first.crash();
    println!(
        "   workstation 0 made work/ and 20 files, wrote only its log ({} log blocks), and was killed holding their locks",
        dirty.log_block_writes
    );
    let killed = Instant::now();
    let listed = second.readdir(directory).await?;
    ensure!(listed.len() == 22, "workstation 1 listed {} entries", listed.len());
    println!(
        "   workstation 1 listed work/ after {:.1} s: the lease lapsed, the lock service sealed it on storage, \
         and workstation 1 replayed the log: all 20 files are there",
        killed.elapsed().as_secs_f64()
    );
    second.sync().await?;
    let report = frangipani::fsck::check(&server.volume.block_client()?).await?;
    ensure!(report.is_clean(), "fsck: {:?}", report.problems);
    println!(
        "   fsck: clean ({} directories, {} files, {} blocks in use)",
        report.directories, report.files, report.blocks
    );
    second.unmount().await?;
    Ok(())
}

/// Accounts of the SQL section's bank, and their opening balance.
const BANK_ACCOUNTS: i64 = 20;
const BANK_OPENING_BALANCE: i64 = 1000;
/// Clients of the SQL section's transfer load.
const BANK_CLIENTS: u64 = 4;

/// Step 8: SQL over the PostgreSQL wire protocol on a fresh cluster: a
/// short session, then bank transfers from four clients while the front
/// end crashes and a new one recovers; the total balance is checked.
async fn sql_section(backend: DiskBackend) -> Result<()> {
    use crate::sql::{Serving, UpOptions};
    use db_frontend::sql::server::ServerConfig;
    println!("\n== 8. SQL: the toy engine over the PostgreSQL wire protocol, on a fresh six-node cluster");
    let up = UpOptions {
        port: 0,
        replicas: 1,
        user: "lab".into(),
        password: None,
        trust: true,
        data_dir: None,
        cache_pages: db_frontend::engine::CACHE_PAGES_DEFAULT,
        backend,
    };
    let serving = Serving::start(&up, ServerConfig::trust()).await?;
    let port = serving.writer.address.port();
    println!(
        "   serving on 127.0.0.1:{port} (psql -h 127.0.0.1 -p {port} lab), a replica on {}",
        serving.replicas[0].1.address.port()
    );
    let session = connect_sql(port).await?;
    for statement in [
        "CREATE TABLE accounts (id BIGINT PRIMARY KEY, owner TEXT, balance BIGINT)",
        "INSERT INTO accounts VALUES (1, 'ada', 100), (2, 'bob', 50)",
        "UPDATE accounts SET balance = balance + 10 WHERE id = 2",
        "BEGIN",
        "DELETE FROM accounts WHERE id = 1",
        "ROLLBACK",
        "SELECT id, owner, balance FROM accounts ORDER BY id",
        "SELECT nonsense FROM accounts",
    ] {
        match session.simple_query(statement).await {
            Ok(messages) => {
                let rows: Vec<String> = messages
                    .iter()
                    .filter_map(|message| match message {
                        tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                            (0..row.len()).map(|index| row.get(index).unwrap_or("NULL")).collect::<Vec<_>>().join("|"),
                        ),
                        _ => None,
                    })
                    .collect();
                println!(
                    "   lab=> {statement}{}",
                    if rows.is_empty() { String::new() } else { format!("   -> {}", rows.join(", ")) }
                );
            }
            Err(error) => {
                let code = error.as_db_error().map_or("?".into(), |db| db.code().code().to_string());
                println!("   lab=> {statement}   -> ERROR {code} (the session goes on)");
            }
        }
    }
    let opening: Vec<String> =
        (0..BANK_ACCOUNTS).map(|id| format!("({}, 'bank', {BANK_OPENING_BALANCE})", id + 100)).collect();
    session.batch_execute(&format!("INSERT INTO accounts VALUES {}", opening.join(", "))).await?;
    let total_before = total_balance(&session).await?;
    drop(session);

    // Transfers; the front end crashes in the middle.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (port_sender, port_receiver) = tokio::sync::watch::channel(port);
    let mut clients = Vec::new();
    for client_index in 0..BANK_CLIENTS {
        let (stop, mut port) = (stop.clone(), port_receiver.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = common::rng::SimRng::new(client_index + 1);
            let mut acknowledged = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let current = *port.borrow_and_update();
                let Ok(client) = connect_sql(current).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (from, to) = (rng.below(BANK_ACCOUNTS as u64) + 100, rng.below(BANK_ACCOUNTS as u64) + 100);
                    let amount = rng.below(20) + 1;
                    let script = format!(
                        "BEGIN; UPDATE accounts SET balance = balance - {amount} WHERE id = {from}; \
                         UPDATE accounts SET balance = balance + {amount} WHERE id = {to}; COMMIT"
                    );
                    match tokio::time::timeout(Duration::from_secs(10), client.batch_execute(&script)).await {
                        Ok(Ok(())) => acknowledged += 1,
                        _ => break,
                    }
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let Serving { writer, replicas, store, cluster, .. } = serving;
    store.volume().close(); // the crash: no clean shutdown
    let crashed = Instant::now();
    writer.stop().await?;
    for (replica, handle) in replicas {
        handle.stop().await?;
        replica.stop().await;
    }
    let volume = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await?);
    let (store, report) =
        db_frontend::engine::AuroraKv::open(volume.clone(), db_frontend::engine::CACHE_PAGES_DEFAULT).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let writer = db_frontend::sql::server::spawn(listener, store, ServerConfig::trust())?;
    println!(
        "   {BANK_CLIENTS} clients transferring; the front end crashed; a new one recovered the volume and served again after {:.0} ms \
         ({} undo entries of an open transaction rolled back)",
        crashed.elapsed().as_secs_f64() * 1000.0,
        report.rolled_back_entries
    );
    port_sender.send(writer.address.port())?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = 0;
    for client in clients {
        acknowledged += client.await?;
    }
    let session = connect_sql(writer.address.port()).await?;
    let total_after = total_balance(&session).await?;
    ensure!(total_after == total_before, "the total balance went from {total_before} to {total_after}");
    println!("   {acknowledged} transfers acknowledged; total balance {total_after} before and after: conserved");
    drop(session);
    writer.stop().await?;
    volume.close();
    let mut cluster = cluster;
    cluster.stop();
    Ok(())
}

async fn connect_sql(port: u16) -> Result<tokio_postgres::Client> {
    let url = format!("host=127.0.0.1 port={port} user=lab dbname=lab");
    let (client, driver) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(driver);
    Ok(client)
}

async fn total_balance(session: &tokio_postgres::Client) -> Result<i64> {
    let rows = session.query("SELECT SUM(balance) FROM accounts", &[]).await?;
    let total: Option<i64> = rows.first().context("SUM returned no row")?.get(0);
    total.context("SUM was NULL")
}
