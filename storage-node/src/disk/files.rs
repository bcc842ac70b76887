//! Numbered, preallocated log files in a segment directory.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const ZERO_CHUNK_BYTES: usize = 1024 * 1024;
/// Background zero-filling goes in small steps with pauses between them.
/// Each step is handed to writeback at once (`sync_file_range`, no device
/// cache flush), so neither a burst of dirty pages nor extra flushes reach
/// the device queue that log fdatasyncs wait in; one fdatasync at the end
/// makes the file durable. 128 KiB per 4 ms is at most 32 MB/s per node.
const PACED_CHUNK_BYTES: usize = 128 * 1024;
const PACED_PAUSE: std::time::Duration = std::time::Duration::from_millis(4);

/// The next log file being zero-filled in the background: its number, the
/// flag that tells its thread to finish at once, and the thread that
/// returns it.
type Preparation = Option<(u64, Arc<AtomicBool>, std::thread::JoinHandle<io::Result<File>>)>;

/// The log files of one segment directory.
#[derive(Debug)]
pub struct LogFiles {
    directory: PathBuf,
    file_bytes: u64,
    open: Mutex<BTreeMap<u64, Arc<File>>>,
    /// A file created ahead of need, so a roll does not wait for zeroing.
    /// Its lock also serializes every creation in the directory, so two
    /// creators never share a temporary file.
    preparing: Mutex<Preparation>,
    /// The highest file whose successor's preparation was considered.
    prepared_after: AtomicU64,
}

fn file_name(number: u64) -> String {
    format!("{number:08}.log")
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Creates `number` filled with zeros, durably, under a temporary name first
/// so a crash never leaves a half-zeroed file that looks like a log file.
/// With `pacing`, the zeros go out in small steps with pauses (background
/// preparation) until the flag in it is set: a log is waiting for the file,
/// and the rest is allocated at once (`fallocate`, which reads as zeros)
/// rather than written. Without, zeros as fast as possible.
fn create_zeroed(directory: &Path, number: u64, file_bytes: u64, pacing: Option<&AtomicBool>) -> io::Result<File> {
    let temporary = directory.join(format!("{}.tmp", file_name(number)));
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).read(true).open(&temporary)?;
    let step = if pacing.is_some() { PACED_CHUNK_BYTES } else { ZERO_CHUNK_BYTES };
    let zeros = vec![0u8; step];
    let mut written = 0u64;
    while written < file_bytes {
        if pacing.is_some_and(|hurry| hurry.load(Ordering::Relaxed)) && allocate(&file, written, file_bytes).is_ok() {
            break;
        }
        let chunk = (file_bytes - written).min(step as u64) as usize;
        file.write_all(&zeros[..chunk])?;
        if pacing.is_some() {
            start_writeback(&file, written, chunk as u64)?;
            std::thread::sleep(PACED_PAUSE);
        }
        written += chunk as u64;
    }
    file.sync_all()?;
    fs::rename(&temporary, directory.join(file_name(number)))?;
    sync_directory(directory)?;
    Ok(file)
}

/// Allocates `[from, to)` of `file` without writing it (Linux `fallocate`).
fn allocate(file: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call and the
    // call reads no memory of ours.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, from as i64, (to - from) as i64) };
    if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Starts writeback of a range without waiting for it and without a device
/// cache flush (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`).
fn start_writeback(file: &File, offset: u64, length: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call and the
    // call reads no memory of ours.
    let result =
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, length as i64, libc::SYNC_FILE_RANGE_WRITE) };
    if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

impl LogFiles {
    pub fn open(directory: &Path, file_bytes: u64) -> io::Result<LogFiles> {
        fs::create_dir_all(directory)?;
        for entry in fs::read_dir(directory)? {
            let path = entry?.path();
            if path.extension().is_some_and(|extension| extension == "tmp") {
                fs::remove_file(path)?;
            }
        }
        Ok(LogFiles {
            directory: directory.to_path_buf(),
            file_bytes,
            open: Mutex::new(BTreeMap::new()),
            preparing: Mutex::new(None),
            prepared_after: AtomicU64::new(0),
        })
    }

    /// Numbers of the log files present, ascending.
    pub fn numbers(&self) -> io::Result<Vec<u64>> {
        let mut numbers = Vec::new();
        for entry in fs::read_dir(&self.directory)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(number) = name.strip_suffix(".log").and_then(|stem| stem.parse::<u64>().ok()) {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Every log file's bytes.
    pub fn read_all(&self) -> io::Result<Vec<(u64, bytes::Bytes)>> {
        self.numbers()?
            .into_iter()
            .map(|number| Ok((number, bytes::Bytes::from(fs::read(self.directory.join(file_name(number)))?))))
            .collect()
    }

    /// The open file `number`, creating (zero-filled) it if needed.
    pub fn file(&self, number: u64) -> io::Result<Arc<File>> {
        if let Some(file) = self.open.lock().get(&number) {
            return Ok(file.clone());
        }
        let mut preparing = self.preparing.lock();
        if let Some(file) = self.open.lock().get(&number) {
            return Ok(file.clone());
        }
        // Wait for any background creation before touching the directory.
        if let Some((_, hurry, _)) = preparing.as_ref() {
            hurry.store(true, Ordering::Relaxed);
        }
        let prepared = match preparing.take() {
            Some((prepared_number, _, thread)) => match thread.join() {
                Ok(Ok(file)) if prepared_number == number => Some(file),
                Ok(Err(error)) => {
                    tracing::warn!(%error, number = prepared_number, "preparing a log file failed; making it on demand");
                    None
                }
                _ => None,
            },
            None => None,
        };
        let path = self.directory.join(file_name(number));
        let file = match prepared {
            Some(file) => Arc::new(file),
            None if path.exists() => Arc::new(OpenOptions::new().read(true).write(true).open(&path)?),
            None => Arc::new(create_zeroed(&self.directory, number, self.file_bytes, None)?),
        };
        self.open.lock().insert(number, file.clone());
        Ok(file)
    }

    /// The open file for a write that ends at `end` in file `number`. Once a
    /// write passes a quarter of a file, the next file is zero-filled in the
    /// background, paced (not at once: six nodes preparing files together
    /// would saturate the one disk the logs are flushed to).
    pub fn file_for_write(&self, number: u64, end: u64) -> io::Result<Arc<File>> {
        let file = self.file(number)?;
        if end > self.file_bytes / 4 && self.prepared_after.load(Ordering::Relaxed) < number {
            self.prepared_after.store(number, Ordering::Relaxed);
            let mut preparing = self.preparing.lock();
            let next = number + 1;
            if preparing.is_none() && !self.directory.join(file_name(next)).exists() {
                let (directory, file_bytes) = (self.directory.clone(), self.file_bytes);
                let hurry = Arc::new(AtomicBool::new(false));
                let flag = hurry.clone();
                let thread = std::thread::spawn(move || create_zeroed(&directory, next, file_bytes, Some(&flag)));
                *preparing = Some((next, hurry, thread));
            }
        }
        Ok(file)
    }

    pub fn zero(&self, file: u64, offset: u64, length: u64) -> io::Result<()> {
        let handle = self.file(file)?;
        let zeros = vec![0u8; length.min(ZERO_CHUNK_BYTES as u64) as usize];
        let mut done = 0;
        while done < length {
            let chunk = (length - done).min(zeros.len() as u64) as usize;
            handle.write_all_at(&zeros[..chunk], offset + done)?;
            done += chunk as u64;
        }
        handle.sync_data()
    }

    pub fn delete(&self, number: u64) -> io::Result<()> {
        self.open.lock().remove(&number);
        fs::remove_file(self.directory.join(file_name(number)))?;
        sync_directory(&self.directory)
    }
}
