//! Numbered, preallocated log files in a segment directory.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const ZERO_CHUNK_BYTES: usize = 1024 * 1024;

/// A log file made ready ahead of need: its number and open handle.
type PreparedFile = Arc<Mutex<Option<(u64, Arc<File>)>>>;

/// The log files of one segment directory.
#[derive(Debug)]
pub struct LogFiles {
    directory: PathBuf,
    file_bytes: u64,
    open: Mutex<BTreeMap<u64, Arc<File>>>,
    /// A file created ahead of need, so a roll does not wait for zeroing.
    prepared: PreparedFile,
}

fn file_name(number: u64) -> String {
    format!("{number:08}.log")
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Creates `number` filled with zeros, durably, under a temporary name first
/// so a crash never leaves a half-zeroed file that looks like a log file.
fn create_zeroed(directory: &Path, number: u64, file_bytes: u64) -> io::Result<File> {
    let temporary = directory.join(format!("{}.tmp", file_name(number)));
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).read(true).open(&temporary)?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut remaining = file_bytes;
    while remaining > 0 {
        let chunk = remaining.min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all(&zeros[..chunk])?;
        remaining -= chunk as u64;
    }
    file.sync_all()?;
    fs::rename(&temporary, directory.join(file_name(number)))?;
    sync_directory(directory)?;
    Ok(file)
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
            prepared: Arc::new(Mutex::new(None)),
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

    /// The open file `number`, creating (zero-filled) it if needed, and
    /// starting to prepare the one after it.
    pub fn file(&self, number: u64) -> io::Result<Arc<File>> {
        if let Some(file) = self.open.lock().get(&number) {
            return Ok(file.clone());
        }
        let path = self.directory.join(file_name(number));
        let file = if path.exists() {
            Arc::new(OpenOptions::new().read(true).write(true).open(&path)?)
        } else {
            let prepared = self.prepared.lock().take();
            match prepared {
                Some((prepared_number, file)) if prepared_number == number => file,
                _ => Arc::new(create_zeroed(&self.directory, number, self.file_bytes)?),
            }
        };
        self.open.lock().insert(number, file.clone());
        self.prepare(number + 1);
        Ok(file)
    }

    fn prepare(&self, number: u64) {
        if self.directory.join(file_name(number)).exists() {
            return;
        }
        let directory = self.directory.clone();
        let file_bytes = self.file_bytes;
        let prepared = self.prepared.clone();
        std::thread::spawn(move || match create_zeroed(&directory, number, file_bytes) {
            Ok(file) => *prepared.lock() = Some((number, Arc::new(file))),
            Err(error) => {
                tracing::warn!(%error, number, "could not prepare the next log file; it will be made on demand")
            }
        });
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
