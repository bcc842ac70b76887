//! Plain files: a worker thread per segment runs `pwrite` then `fdatasync`
//! (a large write's aligned middle `O_DIRECT`, see `LogFiles::write`).

use super::files::DirectStaging;
use super::{LogDisk, LogFiles, WriteDone};
use crate::log_format::LogPosition;
use crate::segment::LogWrite;
use bytes::Bytes;
use crossbeam::channel::{Sender, unbounded};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A segment log on std files.
#[derive(Debug)]
pub struct StdFileDisk {
    files: Arc<LogFiles>,
    jobs: Sender<(LogWrite, WriteDone)>,
}

impl StdFileDisk {
    pub fn open(directory: &Path, file_bytes: u64) -> io::Result<StdFileDisk> {
        let files = Arc::new(LogFiles::open(directory, file_bytes)?);
        let (jobs, queue) = unbounded::<(LogWrite, WriteDone)>();
        let worker_files = files.clone();
        std::thread::Builder::new().name("segment-disk".into()).spawn(move || {
            // Ends when the disk (the only sender) is dropped.
            let mut staging = DirectStaging::default();
            for (write, done) in queue {
                let result = worker_files
                    .write(write.position.file, write.position.offset, &write.bytes, &mut staging)
                    .and_then(|file| file.sync_data());
                done(result);
            }
        })?;
        Ok(StdFileDisk { files, jobs })
    }
}

impl LogDisk for StdFileDisk {
    fn read_all(&self) -> io::Result<Vec<(u64, Bytes)>> {
        self.files.read_all()
    }

    fn write_durable(&self, write: LogWrite, done: WriteDone) -> Option<io::Result<()>> {
        if let Err(error) = self.jobs.send((write, done)) {
            let (_, done) = error.into_inner();
            done(Err(io::Error::other("disk worker is gone")));
        }
        None
    }

    fn zero(&self, position: LogPosition, length: u64) -> io::Result<()> {
        self.files.zero(position.file, position.offset, length)
    }

    fn delete_file(&self, file: u64) -> io::Result<()> {
        self.files.delete(file)
    }
}
