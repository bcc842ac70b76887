//! Connections that carry frames, over TCP or in memory.
//!
//! A [`Connection`] is a [`FrameSender`] (clonable, bounded queue, never
//! blocks the caller with `try_send`) and a [`FrameReceiver`] (yields checked
//! [`Frame`]s, or the [`FrameError`] that ended the connection). Both
//! [`TcpTransport`] and [`MemoryNetwork`] hand out the same types, so servers
//! and clients are written once and tested over either.
//!
//! A receiver that meets a malformed, oversized or wrong-version frame yields
//! that error once and then ends: only that connection is closed.

mod memory;
pub(crate) mod tcp;

pub use memory::{FaultConfig, MemoryNetwork};
pub use tcp::TcpTransport;

use crate::frame::{Frame, FrameError, decode_frame};
use crate::limits::CONNECTION_SEND_QUEUE_FRAMES_MAX;
use bytes::{Bytes, BytesMut};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A boxed future, so that [`Transport`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can listen for and open frame connections.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Listens at `address` ("127.0.0.1:0" picks a free port for TCP).
    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Listener>>;
    /// Opens a connection to `address`.
    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<Connection>>;
    /// Bytes sent and received by every connection this transport made.
    fn traffic(&self) -> Arc<TrafficCounters>;
}

/// Byte and frame counts of a transport's connections.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
}

impl TrafficCounters {
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }
}

/// One open connection.
#[derive(Debug)]
pub struct Connection {
    pub sender: FrameSender,
    pub receiver: FrameReceiver,
    /// The peer's address, for logs.
    pub peer: String,
}

/// A frame queued for sending, with the time it was queued (link delay is
/// measured from it).
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) frame: Bytes,
    pub(crate) queued_at: Instant,
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("send queue full (CONNECTION_SEND_QUEUE_FRAMES_MAX = {CONNECTION_SEND_QUEUE_FRAMES_MAX})")]
    Full,
    #[error("connection closed")]
    Closed,
}

/// The sending half of a connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FrameSender {
    queue: mpsc::Sender<Outbound>,
    /// The socket itself, when this connection writes frames at once (see
    /// [`TcpTransport::with_direct_writes`]).
    direct: Option<Arc<tcp::DirectSocket>>,
    traffic: Arc<TrafficCounters>,
}

impl FrameSender {
    pub(crate) fn new(traffic: Arc<TrafficCounters>) -> (FrameSender, mpsc::Receiver<Outbound>) {
        Self::with_direct_socket(None, traffic)
    }

    pub(crate) fn with_direct_socket(
        direct: Option<Arc<tcp::DirectSocket>>,
        traffic: Arc<TrafficCounters>,
    ) -> (FrameSender, mpsc::Receiver<Outbound>) {
        let (queue, receiver) = mpsc::channel(CONNECTION_SEND_QUEUE_FRAMES_MAX);
        (FrameSender { queue, direct, traffic }, receiver)
    }

    /// Sends an encoded frame without waiting: on a direct-write connection
    /// it is written to the socket at once when nothing is queued ahead of
    /// it and the socket takes it; otherwise it is queued for the
    /// connection's writer task. A full queue is reported, never waited on:
    /// the caller decides what a slow peer means.
    pub fn try_send(&self, frame: Bytes) -> Result<(), SendError> {
        let length = frame.len() as u64;
        let outbound = Outbound { frame, queued_at: Instant::now() };
        let result = match &self.direct {
            Some(direct) => direct.write_or_queue(outbound, &self.queue),
            None => Self::queue(&self.queue, outbound),
        };
        if result.is_ok() {
            self.count(length);
        }
        result
    }

    fn queue(queue: &mpsc::Sender<Outbound>, outbound: Outbound) -> Result<(), SendError> {
        queue.try_send(outbound).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Sends an encoded frame, waiting for room in the queue if it is full.
    pub async fn send(&self, frame: Bytes) -> Result<(), SendError> {
        loop {
            match self.try_send(frame.clone()) {
                Err(SendError::Full) => {
                    // Wait until the writer task took a frame, then try again.
                    drop(self.queue.reserve().await.map_err(|_| SendError::Closed)?);
                }
                done => return done,
            }
        }
    }

    fn count(&self, length: u64) {
        self.traffic.bytes_sent.fetch_add(length, Ordering::Relaxed);
        self.traffic.frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// True once the connection's sending side is gone.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

/// The receiving half of a connection.
#[derive(Debug)]
pub struct FrameReceiver {
    source: ReceiveSource,
    buffer: BytesMut,
    traffic: Arc<TrafficCounters>,
    failed: bool,
}

#[derive(Debug)]
enum ReceiveSource {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Memory(mpsc::UnboundedReceiver<Bytes>),
}

impl FrameReceiver {
    pub(crate) fn tcp(read: tokio::net::tcp::OwnedReadHalf, traffic: Arc<TrafficCounters>) -> Self {
        FrameReceiver {
            source: ReceiveSource::Tcp(read),
            buffer: BytesMut::with_capacity(64 * 1024),
            traffic,
            failed: false,
        }
    }

    pub(crate) fn memory(receiver: mpsc::UnboundedReceiver<Bytes>, traffic: Arc<TrafficCounters>) -> Self {
        FrameReceiver { source: ReceiveSource::Memory(receiver), buffer: BytesMut::new(), traffic, failed: false }
    }

    /// The next frame; `None` when the peer closed cleanly; `Some(Err)` once
    /// for a frame that ends the connection, then `None`.
    pub async fn recv(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            if self.failed {
                return None;
            }
            match decode_frame(&mut self.buffer) {
                Ok(Some(frame)) => {
                    self.traffic.frames_received.fetch_add(1, Ordering::Relaxed);
                    return Some(Ok(frame));
                }
                Ok(None) => {}
                Err(error) => {
                    self.failed = true;
                    return Some(Err(error));
                }
            }
            let received = match &mut self.source {
                ReceiveSource::Tcp(read) => {
                    use tokio::io::AsyncReadExt;
                    if self.buffer.capacity() - self.buffer.len() < 4096 {
                        self.buffer.reserve(64 * 1024);
                    }
                    match read.read_buf(&mut self.buffer).await {
                        Ok(0) | Err(_) => return None,
                        Ok(count) => count,
                    }
                }
                ReceiveSource::Memory(receiver) => match receiver.recv().await {
                    Some(bytes) => {
                        self.buffer.extend_from_slice(&bytes);
                        bytes.len()
                    }
                    None => return None,
                },
            };
            self.traffic.bytes_received.fetch_add(received as u64, Ordering::Relaxed);
        }
    }
}

/// Accepts connections.
#[derive(Debug)]
pub struct Listener {
    source: ListenSource,
    local_address: String,
}

#[derive(Debug)]
enum ListenSource {
    Tcp(tokio::net::TcpListener, TcpTransport),
    Memory(mpsc::UnboundedReceiver<Connection>),
}

impl Listener {
    /// The address clients connect to.
    pub fn local_address(&self) -> &str {
        &self.local_address
    }

    /// The next connection; `Err` when the listener is gone.
    pub async fn accept(&mut self) -> io::Result<Connection> {
        match &mut self.source {
            ListenSource::Tcp(listener, transport) => {
                let (stream, peer) = listener.accept().await?;
                Ok(transport.wrap(stream, peer.to_string()))
            }
            ListenSource::Memory(receiver) => receiver
                .recv()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "memory listener closed")),
        }
    }
}
