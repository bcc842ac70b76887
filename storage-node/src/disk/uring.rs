//! io_uring: one ring and one thread per node serve every segment's log.
//!
//! A log write becomes two linked SQEs, `write` then `fsync(DATASYNC)`, so the
//! kernel runs the flush right after the write without a round trip to user
//! space, and writes of different segments are in flight at the same time.
//! New jobs wake the ring thread through an eventfd that the ring itself is
//! reading, so the thread only ever blocks in `io_uring_enter`.

use super::{LogDisk, LogFiles, WriteDone};
use crate::log_format::LogPosition;
use crate::segment::LogWrite;
use bytes::Bytes;
use crossbeam::channel::{Receiver, Sender, unbounded};
use io_uring::{IoUring, opcode, squeue, types};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

/// Ring size: each log write takes two entries.
const RING_ENTRIES: u32 = 256;
const WAKE_TOKEN: u64 = u64::MAX;

enum Job {
    Write { file: Arc<File>, write: LogWrite, done: WriteDone },
    Shutdown,
}

/// The ring of one node. Dropping it stops the thread after in-flight writes finish.
#[derive(Debug)]
pub struct UringRing {
    jobs: Sender<Job>,
    wake: Arc<OwnedFd>,
}

fn wake(eventfd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
    let written = unsafe { libc::write(eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    debug_assert_eq!(written, 8, "eventfd write");
}

impl UringRing {
    /// Starts the ring thread. Fails if the kernel refuses io_uring.
    pub fn start() -> io::Result<Arc<UringRing>> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (jobs, queue) = unbounded();
        let thread_eventfd = eventfd.clone();
        std::thread::Builder::new().name("io-uring".into()).spawn(move || {
            if let Err(error) = run_ring(ring, queue, thread_eventfd) {
                tracing::error!(%error, "io_uring thread failed");
            }
        })?;
        Ok(Arc::new(UringRing { jobs, wake: eventfd }))
    }

    fn submit(&self, job: Job) {
        if let Err(error) = self.jobs.send(job) {
            if let Job::Write { done, .. } = error.into_inner() {
                done(Err(io::Error::other("io_uring thread is gone")));
            }
            return;
        }
        wake(&self.wake);
    }
}

impl Drop for UringRing {
    fn drop(&mut self) {
        self.submit(Job::Shutdown);
    }
}

/// A log write between submission and its flush's completion.
struct InFlight {
    _file: Arc<File>,
    write: LogWrite,
    done: WriteDone,
    write_result: Option<i32>,
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an entry points to is owned by an `InFlight`
        // (or the wake counter) that lives until its completion is reaped.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

fn run_ring(mut ring: IoUring, queue: Receiver<Job>, eventfd: Arc<OwnedFd>) -> io::Result<()> {
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_slot: u64 = 0;
    let mut wake_counter: Box<u64> = Box::new(0);
    let mut shutting_down = false;
    let arm_wake = |ring: &mut IoUring, counter: &mut u64| {
        let read = opcode::Read::new(types::Fd(eventfd.as_raw_fd()), (counter as *mut u64).cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        push(ring, &read)
    };
    arm_wake(&mut ring, &mut wake_counter)?;
    loop {
        ring.submit_and_wait(1)?;
        let completions: Vec<(u64, i32)> = ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (user_data, result) in completions {
            if user_data == WAKE_TOKEN {
                for job in queue.try_iter() {
                    match job {
                        Job::Shutdown => shutting_down = true,
                        Job::Write { file, write, done } => {
                            let slot = next_slot;
                            next_slot += 1;
                            let fd: RawFd = file.as_raw_fd();
                            let entry = InFlight { _file: file, write, done, write_result: None };
                            let write_entry = opcode::Write::new(
                                types::Fd(fd),
                                entry.write.bytes.as_ptr(),
                                entry.write.bytes.len() as u32,
                            )
                            .offset(entry.write.position.offset)
                            .build()
                            .flags(squeue::Flags::IO_LINK)
                            .user_data(slot << 1);
                            let flush = opcode::Fsync::new(types::Fd(fd))
                                .flags(types::FsyncFlags::DATASYNC)
                                .build()
                                .user_data((slot << 1) | 1);
                            in_flight.insert(slot, entry);
                            push(&mut ring, &write_entry)?;
                            push(&mut ring, &flush)?;
                        }
                    }
                }
                if !shutting_down {
                    arm_wake(&mut ring, &mut wake_counter)?;
                }
                continue;
            }
            let slot = user_data >> 1;
            let is_flush = user_data & 1 == 1;
            if !is_flush {
                in_flight.get_mut(&slot).expect("completion for a known write").write_result = Some(result);
                continue;
            }
            let entry = in_flight.remove(&slot).expect("flush for a known write");
            let expected = entry.write.bytes.len() as i32;
            let outcome = match entry.write_result {
                Some(written) if written < 0 => Err(io::Error::from_raw_os_error(-written)),
                Some(written) if written != expected => {
                    Err(io::Error::other(format!("short log write: {written} of {expected} bytes")))
                }
                _ if result < 0 => Err(io::Error::from_raw_os_error(-result)),
                _ => Ok(()),
            };
            (entry.done)(outcome);
        }
        if shutting_down && in_flight.is_empty() {
            return Ok(());
        }
    }
}

/// A segment log whose writes go through the node's ring.
#[derive(Debug)]
pub struct UringDisk {
    files: LogFiles,
    ring: Arc<UringRing>,
}

impl UringDisk {
    pub fn open(directory: &Path, file_bytes: u64, ring: Arc<UringRing>) -> io::Result<UringDisk> {
        Ok(UringDisk { files: LogFiles::open(directory, file_bytes)?, ring })
    }
}

impl LogDisk for UringDisk {
    fn read_all(&self) -> io::Result<Vec<(u64, Bytes)>> {
        self.files.read_all()
    }

    fn write_durable(&self, write: LogWrite, done: WriteDone) -> Option<io::Result<()>> {
        match self.files.file_for_write(write.position.file, write.position.offset + write.bytes.len() as u64) {
            Ok(file) => {
                self.ring.submit(Job::Write { file, write, done });
                None
            }
            Err(error) => Some(Err(error)),
        }
    }

    fn zero(&self, position: LogPosition, length: u64) -> io::Result<()> {
        self.files.zero(position.file, position.offset, length)
    }

    fn delete_file(&self, file: u64) -> io::Result<()> {
        self.files.delete(file)
    }
}
