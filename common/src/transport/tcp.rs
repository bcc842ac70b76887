//! TCP connections: one writer task per connection that coalesces queued
//! frames into as few `write` calls as it can, and a receiver that decodes
//! frames straight off the socket in the caller's task.
//!
//! An optional send delay holds every frame until `queued_at + delay`: a
//! user-space link delay (this machine has no netem), pipelined so that it
//! adds latency without cutting throughput.

use super::{
    BoxFuture, Connection, FrameReceiver, FrameSender, ListenSource, Listener, Outbound, TrafficCounters, Transport,
};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Most bytes coalesced into one socket write.
const COALESCED_WRITE_BYTES_MAX: usize = 1024 * 1024;

/// TCP over tokio, with an optional user-space send delay.
#[derive(Clone, Debug, Default)]
pub struct TcpTransport {
    send_delay: Option<Duration>,
    traffic: Arc<TrafficCounters>,
}

impl TcpTransport {
    pub fn new() -> Self {
        TcpTransport::default()
    }

    /// Every frame sent on this transport's connections is held back by `delay`.
    pub fn with_send_delay(delay: Duration) -> Self {
        TcpTransport { send_delay: Some(delay), traffic: Arc::default() }
    }

    pub(crate) fn wrap(&self, stream: TcpStream, peer: String) -> Connection {
        // Small frames must leave at once: Nagle would add up to 40 ms.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let (sender, queue) = FrameSender::new(self.traffic.clone());
        tokio::spawn(write_loop(write, queue, self.send_delay));
        Connection { sender, receiver: FrameReceiver::tcp(read, self.traffic.clone()), peer }
    }
}

/// Sends queued frames, coalescing those that are ready into one write.
/// With a delay, a frame leaves `delay` after it was queued; coalescing
/// takes only frames already due, so a steady stream is not held back.
async fn write_loop(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outbound>,
    delay: Option<Duration>,
) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut not_yet_due: Option<Outbound> = None;
    loop {
        let first = match not_yet_due.take() {
            Some(frame) => frame,
            None => match queue.recv().await {
                Some(frame) => frame,
                None => break,
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
        if write.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
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
