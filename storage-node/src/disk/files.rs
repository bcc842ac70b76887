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
    /// The same files opened `O_DIRECT`, for large writes.
    direct: Mutex<BTreeMap<u64, Arc<File>>>,
    /// Cleared when the file system refuses `O_DIRECT`: every write is then
    /// buffered.
    direct_supported: AtomicBool,
    /// Bytes written with `O_DIRECT` (read by the tests).
    direct_bytes: AtomicU64,
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

/// Large writes are copied into the page cache this much at a time, each
/// piece handed to writeback at once (see [`write_streaming`]).
const STREAMED_CHUNK_BYTES: usize = 1024 * 1024;

/// Writes `bytes` at `offset` so the device works while the rest is still
/// being copied: each megabyte goes to writeback as soon as it is in the
/// page cache, instead of all of it waiting for the `fdatasync` that
/// follows (which then only waits for the last piece and flushes), so the
/// copy into the page cache and the device overlap rather than add up. The
/// way large writes go where `O_DIRECT` is refused. Not durable until the
/// caller's `fdatasync`.
fn write_streaming(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    if bytes.len() <= STREAMED_CHUNK_BYTES {
        return file.write_all_at(bytes, offset);
    }
    for (index, chunk) in bytes.chunks(STREAMED_CHUNK_BYTES).enumerate() {
        let at = offset + (index * STREAMED_CHUNK_BYTES) as u64;
        file.write_all_at(chunk, at)?;
        start_writeback(file, at, chunk.len() as u64)?;
    }
    Ok(())
}

/// A write whose page-aligned middle is at least this long skips the page
/// cache (see [`LogFiles::write`]).
const DIRECT_WRITE_BYTES_MIN: usize = 1024 * 1024;
/// `O_DIRECT` alignment of offsets, lengths and memory: the page size, a
/// multiple of every logical block size in use.
const DIRECT_ALIGN: usize = 4096;

/// The page-aligned memory a disk thread copies direct writes through. It
/// is allocated at the first direct write and reused, so its pages are
/// faulted in once: on this VM fresh pages (new page cache, new heap) cost
/// more to touch than the write itself, because freed memory is handed back
/// to the host (virtio-balloon free page reporting) and every first touch
/// of it faults on the host.
#[derive(Debug, Default)]
pub struct DirectStaging {
    memory: Vec<u8>,
}

impl DirectStaging {
    /// `bytes` copied into aligned memory.
    fn aligned_copy(&mut self, bytes: &[u8]) -> &[u8] {
        if self.memory.len() < bytes.len() + DIRECT_ALIGN {
            self.memory = vec![0u8; bytes.len() + DIRECT_ALIGN];
        }
        let start = self.memory.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut self.memory[start..start + bytes.len()];
        aligned.copy_from_slice(bytes);
        aligned
    }
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
            direct: Mutex::new(BTreeMap::new()),
            direct_supported: AtomicBool::new(true),
            direct_bytes: AtomicU64::new(0),
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

    /// Writes `bytes` at `offset` of file `number`; durable only after the
    /// returned file's `fdatasync`. A large write has its page-aligned
    /// middle written `O_DIRECT` from `staging` and only its partial first
    /// and last pages through the page cache: it is copied once into warm
    /// memory instead of into fresh page cache (see [`DirectStaging`]), and
    /// the device starts on it at once. Smaller writes, and every write on
    /// a file system without `O_DIRECT`, are buffered
    /// ([`write_streaming`]).
    pub fn write(&self, number: u64, offset: u64, bytes: &[u8], staging: &mut DirectStaging) -> io::Result<Arc<File>> {
        let end = offset + bytes.len() as u64;
        let file = self.file_for_write(number, end)?;
        let middle_start = offset.next_multiple_of(DIRECT_ALIGN as u64);
        let middle_end = end / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        if middle_end >= middle_start + DIRECT_WRITE_BYTES_MIN as u64
            && let Some(direct) = self.direct_file(number)?
        {
            let head = (middle_start - offset) as usize;
            let tail = (middle_end - offset) as usize;
            match direct.write_all_at(staging.aligned_copy(&bytes[head..tail]), middle_start) {
                Ok(()) => {
                    file.write_all_at(&bytes[..head], offset)?;
                    file.write_all_at(&bytes[tail..], middle_end)?;
                    self.direct_bytes.fetch_add((tail - head) as u64, Ordering::Relaxed);
                    return Ok(file);
                }
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(%error, directory = %self.directory.display(), "O_DIRECT write refused; buffering every write");
                    self.direct_supported.store(false, Ordering::Relaxed);
                }
                Err(error) => return Err(error),
            }
        }
        write_streaming(&file, bytes, offset)?;
        Ok(file)
    }

    /// File `number` opened `O_DIRECT`, or `None` if the file system
    /// refuses it. The file must exist ([`LogFiles::file`]).
    fn direct_file(&self, number: u64) -> io::Result<Option<Arc<File>>> {
        use std::os::unix::fs::OpenOptionsExt;
        if !self.direct_supported.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut direct = self.direct.lock();
        if let Some(file) = direct.get(&number) {
            return Ok(Some(file.clone()));
        }
        match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(self.directory.join(file_name(number))) {
            Ok(file) => Ok(Some(direct.entry(number).or_insert(Arc::new(file)).clone())),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_supported.store(false, Ordering::Relaxed);
                Ok(None)
            }
            Err(error) => Err(error),
        }
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
        self.direct.lock().remove(&number);
        fs::remove_file(self.directory.join(file_name(number)))?;
        sync_directory(&self.directory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large writes at any offset go `O_DIRECT` for their aligned middle and
    /// buffered for their partial pages, between small buffered writes that
    /// share those pages; the log reads back byte for byte as written. The
    /// same holds where `O_DIRECT` is refused and every write is buffered.
    #[test]
    fn direct_and_buffered_writes_leave_exactly_their_bytes() {
        for direct_refused in [false, true] {
            let directory = tempfile::tempdir().unwrap();
            let files = LogFiles::open(directory.path(), 16 * 1024 * 1024).unwrap();
            if direct_refused {
                files.direct_supported.store(false, Ordering::Relaxed);
            }
            let mut staging = DirectStaging::default();
            let mut model = Vec::new();
            let lengths = [100, 3 * DIRECT_WRITE_BYTES_MIN + 777, 5, DIRECT_WRITE_BYTES_MIN + 2 * DIRECT_ALIGN, 4000];
            for (index, length) in lengths.into_iter().enumerate() {
                let bytes: Vec<u8> = (0..length).map(|at| (at * 7 + index) as u8 | 1).collect();
                files.write(1, model.len() as u64, &bytes, &mut staging).unwrap().sync_data().unwrap();
                model.extend_from_slice(&bytes);
            }
            let (number, read) = files.read_all().unwrap().remove(0);
            assert_eq!(number, 1);
            assert!(read[..model.len()] == model[..], "the log differs from what was written");
            assert!(read[model.len()..].iter().all(|&byte| byte == 0), "past the writes the file is still zeros");
            if direct_refused {
                assert_eq!(files.direct_bytes.load(Ordering::Relaxed), 0, "nothing goes O_DIRECT once it is refused");
            } else if files.direct_supported.load(Ordering::Relaxed) {
                assert!(
                    files.direct_bytes.load(Ordering::Relaxed) >= 4 * DIRECT_WRITE_BYTES_MIN as u64,
                    "the large writes went O_DIRECT"
                );
            }
        }
    }

    /// A streamed write lands byte for byte where a plain one would,
    /// whatever its length and offset (pieces, a short last piece, a
    /// write under one piece).
    #[test]
    fn a_streamed_write_leaves_exactly_its_bytes() {
        let directory = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(directory.path().join("log"))
            .unwrap();
        let mut model = vec![0u8; 8 * 1024 * 1024];
        let mut offset = 13u64;
        for (index, length) in [3 * STREAMED_CHUNK_BYTES + 777, 100, STREAMED_CHUNK_BYTES + 1].into_iter().enumerate() {
            let bytes: Vec<u8> = (0..length).map(|at| (at * 31 + index) as u8 | 1).collect();
            write_streaming(&file, &bytes, offset).unwrap();
            model[offset as usize..offset as usize + length].copy_from_slice(&bytes);
            offset += length as u64;
        }
        file.sync_data().unwrap();
        let mut read = vec![0u8; offset as usize];
        file.read_exact_at(&mut read, 0).unwrap();
        assert!(read == model[..offset as usize], "the file differs from what was written");
    }
}
