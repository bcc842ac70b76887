//! The physical floors a quorum write is compared against, measured in the
//! same run on the same disk and loopback:
//!
//! - (a) one file, 4 KiB write + fdatasync, round after round;
//! - (b) six files, one in each node's data directory, written and
//!   fdatasync'ed at the same moment; the figure is the time until the 4th
//!   completes — the floor for a 4/6 write on one disk;
//! - the loopback TCP round trip, for `--disk memory` runs.
//!
//! The files are preallocated with zeros first, exactly as segment logs are,
//! so the baselines do the same kind of I/O the nodes do.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use super::report::new_histogram;

/// Bytes per baseline write.
pub const BASELINE_WRITE_BYTES: usize = 4096;
/// Size of each preallocated baseline file; writes wrap around inside it.
const BASELINE_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Round trips of the loopback baseline.
const LOOPBACK_ROUNDS: usize = 20_000;

fn preallocated_file(path: &Path) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating baseline file {}", path.display()))?;
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..BASELINE_FILE_BYTES / zeros.len() as u64 {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    Ok(file)
}

fn write_and_sync(file: &File, round: u64, block: &[u8]) -> Result<()> {
    let offset = (round * BASELINE_WRITE_BYTES as u64) % BASELINE_FILE_BYTES;
    file.write_all_at(block, offset)?;
    file.sync_data()?;
    Ok(())
}

/// Baseline (a): one file, 4 KiB write + fdatasync, for `duration`.
pub fn single_file_fdatasync(directory: &Path, duration: Duration) -> Result<Histogram<u64>> {
    let path = directory.join("baseline-single.dat");
    let file = preallocated_file(&path)?;
    let block = vec![0xA5u8; BASELINE_WRITE_BYTES];
    let mut histogram = new_histogram();
    let end = Instant::now() + duration;
    let mut round = 0;
    while Instant::now() < end {
        let started = Instant::now();
        write_and_sync(&file, round, &block)?;
        histogram.saturating_record(started.elapsed().as_micros() as u64);
        round += 1;
    }
    std::fs::remove_file(&path)?;
    Ok(histogram)
}

/// Baseline (b): six files (one per directory) written and fdatasync'ed at
/// the same moment; each round records when the `quorum`-th finished.
pub fn quorum_shaped_fdatasync(directories: &[PathBuf], quorum: usize, duration: Duration) -> Result<Histogram<u64>> {
    let paths: Vec<PathBuf> = directories.iter().map(|directory| directory.join("baseline-quorum.dat")).collect();
    let files = paths.iter().map(|path| preallocated_file(path)).collect::<Result<Vec<File>>>()?;
    let start_round = Arc::new(Barrier::new(files.len() + 1));
    let (done_sender, done) = mpsc::channel::<Result<Instant>>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = files
        .into_iter()
        .map(|file| {
            let (start_round, done_sender, stop) = (start_round.clone(), done_sender.clone(), stop.clone());
            std::thread::spawn(move || {
                let block = vec![0x5Au8; BASELINE_WRITE_BYTES];
                let mut round = 0;
                loop {
                    start_round.wait();
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    let result = write_and_sync(&file, round, &block).map(|()| Instant::now());
                    if done_sender.send(result).is_err() {
                        return;
                    }
                    round += 1;
                }
            })
        })
        .collect();
    drop(done_sender);
    let mut histogram = new_histogram();
    let end = Instant::now() + duration;
    let mut failure = None;
    while Instant::now() < end && failure.is_none() {
        let started = Instant::now();
        start_round.wait();
        let mut finished = Vec::with_capacity(directories.len());
        for _ in 0..directories.len() {
            match done.recv().context("a baseline writer thread ended")? {
                Ok(at) => finished.push(at),
                Err(error) => failure = Some(error),
            }
        }
        finished.sort_unstable();
        if let Some(at) = finished.get(quorum - 1) {
            histogram.saturating_record(at.duration_since(started).as_micros() as u64);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    start_round.wait();
    for worker in workers {
        let _ = worker.join();
    }
    for path in &paths {
        std::fs::remove_file(path)?;
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(histogram),
    }
}

/// Loopback TCP round trip of a 64-byte message between two threads.
pub fn loopback_round_trip() -> Result<Histogram<u64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = [0u8; 64];
        for _ in 0..LOOPBACK_ROUNDS {
            stream.read_exact(&mut buffer)?;
            stream.write_all(&buffer)?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let mut buffer = [7u8; 64];
    let mut histogram = new_histogram();
    for _ in 0..LOOPBACK_ROUNDS {
        let started = Instant::now();
        stream.write_all(&buffer)?;
        stream.read_exact(&mut buffer)?;
        histogram.saturating_record(started.elapsed().as_nanos().div_ceil(1000) as u64);
    }
    echo.join().map_err(|_| anyhow::anyhow!("loopback echo thread panicked"))??;
    Ok(histogram)
}

/// Round trip of a 64-byte frame through the kit's own TCP transport: a
/// tokio task sends it, an echo task on the other end sends it back. This is
/// the network floor of one request/response as the nodes and the writer
/// see it (the kernel round trip plus the transport's task hand-offs).
pub async fn transport_round_trip() -> Result<Histogram<u64>> {
    use common::frame::encode_frame;
    use common::transport::{TcpTransport, Transport};
    let transport = TcpTransport::new();
    let mut listener = transport.bind("127.0.0.1:0".into()).await?;
    let address = listener.local_address().to_string();
    let echo = tokio::spawn(async move {
        let mut connection = listener.accept().await?;
        while let Some(Ok(frame)) = connection.receiver.recv().await {
            if connection.sender.send(encode_frame(frame.kind, &frame.payload)).await.is_err() {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    });
    let mut connection = transport.connect(address).await?;
    let probe = encode_frame(5, &[7u8; 64]);
    let mut histogram = new_histogram();
    for _ in 0..LOOPBACK_ROUNDS {
        let started = Instant::now();
        connection.sender.send(probe.clone()).await.map_err(|_| anyhow::anyhow!("echo connection closed"))?;
        connection.receiver.recv().await.context("echo connection closed")??;
        histogram.saturating_record(started.elapsed().as_nanos().div_ceil(1000) as u64);
    }
    drop(connection);
    echo.await??;
    Ok(histogram)
}
