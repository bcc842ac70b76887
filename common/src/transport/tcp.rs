//! TCP connections: one writer task per connection that coalesces queued
//! frames into as few `write` calls as it can, and a receiver that decodes
//! frames straight off the socket in the caller's task.
//!
//! With [`TcpTransport::with_direct_writes`], senders also write frames to
//! the socket themselves when nothing is queued ahead, saving the writer
//! task's wake-up on every request/response hop (the lock service uses it).
//! The socket then has one owner at a time, decided under
//! [`DirectSocket`]'s lock: senders while the writer task is idle, the
//! writer task from the moment a frame is queued (the socket was full, or a
//! frame was only partly written) until its queue is empty again, so frames
//! never interleave and keep their order. The storage path keeps queueing:
//! there the replies come from disk threads whose time is better spent on
//! the next log write.
//!
//! An optional send delay holds every frame until `queued_at + delay`: a
//! user-space link delay (this machine has no netem), pipelined so that it
//! adds latency without cutting throughput. Delayed connections always
//! queue.

use super::SendError;
use super::{
    BoxFuture, Connection, FrameReceiver, FrameSender, ListenSource, Listener, Outbound, TrafficCounters, Transport,
};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Most bytes coalesced into one socket write.
const COALESCED_WRITE_BYTES_MAX: usize = 1024 * 1024;

/// TCP over tokio, with an optional user-space send delay.
#[derive(Clone, Debug, Default)]
pub struct TcpTransport {
    send_delay: Option<Duration>,
    direct_writes: bool,
    traffic: Arc<TrafficCounters>,
}

impl TcpTransport {
    pub fn new() -> Self {
        TcpTransport::default()
    }

    /// Every frame sent on this transport's connections is held back by `delay`.
    pub fn with_send_delay(delay: Duration) -> Self {
        TcpTransport { send_delay: Some(delay), direct_writes: false, traffic: Arc::default() }
    }

    /// Senders write frames straight to the socket when nothing is queued
    /// (see the module documentation).
    pub fn with_direct_writes() -> Self {
        TcpTransport { send_delay: None, direct_writes: true, traffic: Arc::default() }
    }

    pub(crate) fn wrap(&self, stream: TcpStream, peer: String) -> Connection {
        // Small frames must leave at once: Nagle would add up to 40 ms.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let socket = Arc::new(DirectSocket { write, writer_task_owns: Mutex::new(false) });
        let direct = (self.direct_writes && self.send_delay.is_none()).then(|| socket.clone());
        let (sender, queue) = FrameSender::with_direct_socket(direct, self.traffic.clone());
        tokio::spawn(write_loop(socket, queue, self.send_delay));
        Connection { sender, receiver: FrameReceiver::tcp(read, self.traffic.clone()), peer }
    }
}

/// A connection's socket, shared by its senders and its writer task.
#[derive(Debug)]
pub(crate) struct DirectSocket {
    write: OwnedWriteHalf,
    /// Whether the writer task owns the socket: frames are queued or one is
    /// partly written. Senders write directly only while it is false.
    writer_task_owns: Mutex<bool>,
}

impl DirectSocket {
    /// Writes `outbound` now if the socket is free and takes it whole;
    /// otherwise queues it (or its unwritten rest) and hands the socket to
    /// the writer task.
    pub(crate) fn write_or_queue(&self, outbound: Outbound, queue: &mpsc::Sender<Outbound>) -> Result<(), SendError> {
        let mut writer_task_owns = self.writer_task_owns.lock();
        if *writer_task_owns {
            return FrameSender::queue(queue, outbound);
        }
        let written = match self.write.try_write(&outbound.frame) {
            Ok(written) if written == outbound.frame.len() => return Ok(()),
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(SendError::Closed),
        };
        // The writer task's queue is empty whenever it does not own the
        // socket, so the rest of a partly written frame always fits.
        let rest = Outbound { frame: outbound.frame.slice(written..), queued_at: outbound.queued_at };
        FrameSender::queue(queue, rest)?;
        *writer_task_owns = true;
        Ok(())
    }

    /// Hands the socket back to the senders if nothing is queued (checked
    /// under the lock that senders queue under, so no frame is left behind).
    fn release_if_idle(&self, queue: &mpsc::Receiver<Outbound>) {
        let mut writer_task_owns = self.writer_task_owns.lock();
        if queue.is_empty() {
            *writer_task_owns = false;
        }
    }

    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.write.writable().await?;
            match self.write.try_write(bytes) {
                Ok(written) => bytes = &bytes[written..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// Sends queued frames, coalescing those that are ready into one write.
/// With a delay, a frame leaves `delay` after it was queued; coalescing
/// takes only frames already due, so a steady stream is not held back.
/// Ends when every sender is gone (dropping the socket then shuts it down)
/// or the socket fails.
async fn write_loop(socket: Arc<DirectSocket>, mut queue: mpsc::Receiver<Outbound>, delay: Option<Duration>) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut not_yet_due: Option<Outbound> = None;
    loop {
        let first = match not_yet_due.take() {
            Some(frame) => frame,
            None => match queue.recv().await {
                Some(frame) => frame,
                None => return,
            },
        };
        if let Some(delay) = delay {
            tokio::time::sleep_until(first.queued_at + delay).await;
        }
        buffer.clear();
        buffer.extend_from_slice(&first.frame);
        while buffer.len() < COALESCED_WRITE_BYTES_MAX {
            match queue.try_recv() {
                Ok(next) if delay.is_some_and(|delay| next.queued_at + delay > tokio::time::Instant::now()) => {
                    not_yet_due = Some(next);
                    break;
                }
                Ok(next) => buffer.extend_from_slice(&next.frame),
                Err(_) => break,
            }
        }
        if socket.write_all(&buffer).await.is_err() {
            return;
        }
        if not_yet_due.is_none() {
            socket.release_if_idle(&queue);
        }
    }
}

impl Transport for TcpTransport {
    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Listener>> {
        let transport = self.clone();
        Box::pin(async move {
            let listener = TcpListener::bind(&address).await?;
            let local_address = listener.local_addr()?.to_string();
            Ok(Listener { source: ListenSource::Tcp(listener, transport), local_address })
        })
    }

    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<Connection>> {
        let transport = self.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(&address).await?;
            Ok(transport.wrap(stream, address))
        })
    }

    fn traffic(&self) -> Arc<TrafficCounters> {
        self.traffic.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;
    use tokio::io::AsyncWriteExt;

    /// Direct writes from several tasks into a socket nobody reads until
    /// they are done: 26 MB of frames cannot fit in loopback socket buffers
    /// (send at most 4 MB by default `tcp_wmem`; the receive buffer grows
    /// only as the reader reads), so writes go partial or block and the
    /// writer task takes over, then hands the socket back. Every frame
    /// arrives whole, and each sender's frames in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_never_interleave_or_reorder_frames() {
        const SENDERS: u32 = 4;
        const FRAMES: u32 = 400;
        let transport = TcpTransport::with_direct_writes();
        let mut listener = transport.bind("127.0.0.1:0".into()).await.unwrap();
        let client = transport.connect(listener.local_address().to_string()).await.unwrap();
        let mut served = listener.accept().await.unwrap();
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender_id| {
                let sender = client.sender.clone();
                tokio::spawn(async move {
                    for sequence in 0..FRAMES {
                        // 16 KiB frames fill the socket buffer quickly.
                        let mut payload = vec![(sequence % 251) as u8; 16 * 1024];
                        payload[..4].copy_from_slice(&sender_id.to_le_bytes());
                        payload[4..8].copy_from_slice(&sequence.to_le_bytes());
                        // The queue (CONNECTION_SEND_QUEUE_FRAMES_MAX) holds them all.
                        sender.try_send(encode_frame(9, &payload)).unwrap();
                        if sequence % 50 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        let mut next = [0u32; SENDERS as usize];
        for _ in 0..SENDERS * FRAMES {
            let frame = served.receiver.recv().await.unwrap().expect("a whole, checksummed frame");
            let sender_id = u32::from_le_bytes(frame.payload[..4].try_into().unwrap()) as usize;
            let sequence = u32::from_le_bytes(frame.payload[4..8].try_into().unwrap());
            assert_eq!(sequence, next[sender_id], "sender {sender_id}'s frames out of order");
            assert!(frame.payload[8..].iter().all(|byte| *byte == (sequence % 251) as u8));
            next[sender_id] += 1;
        }
    }

    #[tokio::test]
    async fn frames_cross_loopback_and_bad_bytes_end_only_that_connection() {
        let transport = TcpTransport::new();
        let mut listener = transport.bind("127.0.0.1:0".into()).await.unwrap();
        let address = listener.local_address().to_string();
        let good = transport.connect(address.clone()).await.unwrap();
        let mut served_good = listener.accept().await.unwrap();
        good.sender.try_send(encode_frame(4, b"ping")).unwrap();
        let frame = served_good.receiver.recv().await.unwrap().unwrap();
        assert_eq!((frame.kind, &frame.payload[..]), (4, &b"ping"[..]));

        let mut raw = TcpStream::connect(&address).await.unwrap();
        let mut served_bad = listener.accept().await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(served_bad.receiver.recv().await, Some(Err(_))));
        assert!(served_bad.receiver.recv().await.is_none());

        good.sender.try_send(encode_frame(4, b"still here")).unwrap();
        let frame = served_good.receiver.recv().await.unwrap().unwrap();
        assert_eq!(&frame.payload[..], b"still here");
    }
}
