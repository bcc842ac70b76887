//! In-memory connections with seeded fault injection.
//!
//! Every frame passes through a pump that, under one [`SimRng`], may drop it,
//! deliver it twice, hold it back (so later frames overtake it), or delay it;
//! a partition between two addresses drops everything between them. Tests
//! run the same servers and clients as over TCP.

use super::{
    BoxFuture, Connection, FrameReceiver, FrameSender, ListenSource, Listener, Outbound, TrafficCounters, Transport,
};
use crate::rng::SimRng;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What may happen to each frame.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    pub drop_probability: f64,
    pub duplicate_probability: f64,
    /// Chance that a frame is held back by `reorder_delay` so later ones overtake it.
    pub reorder_probability: f64,
    pub reorder_delay: Duration,
    /// Every frame is delayed by a uniform draw from this range.
    pub delay_min: Duration,
    pub delay_max: Duration,
}

#[derive(Debug)]
struct NetworkState {
    listeners: BTreeMap<String, mpsc::UnboundedSender<Connection>>,
    /// Unordered address pairs that cannot talk.
    partitions: BTreeSet<(String, String)>,
    faults: FaultConfig,
    rng: SimRng,
    next_client: u64,
}

/// A simulated network; clone it to share.
#[derive(Clone, Debug)]
pub struct MemoryNetwork {
    state: Arc<Mutex<NetworkState>>,
    traffic: Arc<TrafficCounters>,
}

fn pair(first: &str, second: &str) -> (String, String) {
    if first <= second { (first.to_string(), second.to_string()) } else { (second.to_string(), first.to_string()) }
}

/// What the pump does with one frame.
enum Fate {
    Drop,
    Deliver { copies: usize, delay: Duration },
}

impl MemoryNetwork {
    pub fn new(seed: u64) -> Self {
        MemoryNetwork {
            state: Arc::new(Mutex::new(NetworkState {
                listeners: BTreeMap::new(),
                partitions: BTreeSet::new(),
                faults: FaultConfig::default(),
                rng: SimRng::new(seed),
                next_client: 0,
            })),
            traffic: Arc::default(),
        }
    }

    /// Replaces the fault configuration for frames sent from now on.
    pub fn set_faults(&self, faults: FaultConfig) {
        self.state.lock().faults = faults;
    }

    /// Cuts every frame between `first` and `second`, both ways.
    pub fn partition(&self, first: &str, second: &str) {
        self.state.lock().partitions.insert(pair(first, second));
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.state.lock().partitions.clear();
    }

    /// Stops accepting connections at `address` (a crashed server).
    pub fn unbind(&self, address: &str) {
        self.state.lock().listeners.remove(address);
    }

    fn fate(&self, from: &str, to: &str) -> Fate {
        let mut state = self.state.lock();
        if state.partitions.contains(&pair(from, to)) {
            return Fate::Drop;
        }
        let faults = state.faults.clone();
        if state.rng.chance(faults.drop_probability) {
            return Fate::Drop;
        }
        let copies = if state.rng.chance(faults.duplicate_probability) { 2 } else { 1 };
        let spread = faults.delay_max.saturating_sub(faults.delay_min).as_micros() as u64;
        let mut delay =
            faults.delay_min + Duration::from_micros(if spread == 0 { 0 } else { state.rng.below(spread + 1) });
        if state.rng.chance(faults.reorder_probability) {
            delay += faults.reorder_delay;
        }
        Fate::Deliver { copies, delay }
    }

    /// One direction of a connection: frames from `queue` reach `deliver`
    /// after their fate is drawn.
    fn spawn_pump(
        &self,
        from: String,
        to: String,
        mut queue: mpsc::Receiver<Outbound>,
        deliver: mpsc::UnboundedSender<Bytes>,
    ) {
        let network = self.clone();
        tokio::spawn(async move {
            while let Some(outbound) = queue.recv().await {
                match network.fate(&from, &to) {
                    Fate::Drop => {}
                    Fate::Deliver { copies, delay } if delay.is_zero() => {
                        for _ in 0..copies {
                            let _ = deliver.send(outbound.frame.clone());
                        }
                    }
                    Fate::Deliver { copies, delay } => {
                        let deliver = deliver.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            for _ in 0..copies {
                                let _ = deliver.send(outbound.frame.clone());
                            }
                        });
                    }
                }
            }
        });
    }

    fn open(&self, server: &str) -> io::Result<Connection> {
        let (accept_queue, client_address) = {
            let mut state = self.state.lock();
            let accept_queue = state.listeners.get(server).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens at {server}"))
            })?;
            state.next_client += 1;
            (accept_queue, format!("mem-client-{}", state.next_client))
        };
        let (client_sender, client_queue) = FrameSender::new(self.traffic.clone());
        let (server_sender, server_queue) = FrameSender::new(self.traffic.clone());
        let (to_server, server_inbox) = mpsc::unbounded_channel();
        let (to_client, client_inbox) = mpsc::unbounded_channel();
        self.spawn_pump(client_address.clone(), server.to_string(), client_queue, to_server);
        self.spawn_pump(server.to_string(), client_address.clone(), server_queue, to_client);
        let served = Connection {
            sender: server_sender,
            receiver: FrameReceiver::memory(server_inbox, self.traffic.clone()),
            peer: client_address,
        };
        accept_queue
            .send(served)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, format!("listener at {server} is gone")))?;
        Ok(Connection {
            sender: client_sender,
            receiver: FrameReceiver::memory(client_inbox, self.traffic.clone()),
            peer: server.to_string(),
        })
    }
}

impl Transport for MemoryNetwork {
    fn bind(&self, address: String) -> BoxFuture<'static, io::Result<Listener>> {
        let network = self.clone();
        Box::pin(async move {
            let (accept_queue, accepted) = mpsc::unbounded_channel();
            let mut state = network.state.lock();
            if state.listeners.contains_key(&address) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, address));
            }
            state.listeners.insert(address.clone(), accept_queue);
            Ok(Listener { source: ListenSource::Memory(accepted), local_address: address })
        })
    }

    fn connect(&self, address: String) -> BoxFuture<'static, io::Result<Connection>> {
        let network = self.clone();
        Box::pin(async move { network.open(&address) })
    }

    fn traffic(&self) -> Arc<TrafficCounters> {
        self.traffic.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    async fn connected(network: &MemoryNetwork) -> (Connection, Connection) {
        let mut listener = network.bind("server".into()).await.unwrap();
        let client = network.connect("server".into()).await.unwrap();
        let served = listener.accept().await.unwrap();
        (client, served)
    }

    async fn drain(receiver: &mut FrameReceiver) -> Vec<u8> {
        let mut kinds = Vec::new();
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_millis(200), receiver.recv()).await {
            kinds.push(frame.kind);
        }
        kinds
    }

    #[tokio::test(start_paused = true)]
    async fn clean_network_delivers_in_order() {
        let network = MemoryNetwork::new(1);
        let (client, mut served) = connected(&network).await;
        for kind in 0..20 {
            client.sender.try_send(encode_frame(kind, b"")).unwrap();
        }
        assert_eq!(drain(&mut served.receiver).await, (0..20).collect::<Vec<u8>>());
    }

    #[tokio::test(start_paused = true)]
    async fn faults_drop_duplicate_and_reorder_under_a_seed() {
        let run = |seed| async move {
            let network = MemoryNetwork::new(seed);
            network.set_faults(FaultConfig {
                drop_probability: 0.2,
                duplicate_probability: 0.2,
                reorder_probability: 0.2,
                reorder_delay: Duration::from_millis(5),
                ..FaultConfig::default()
            });
            let (client, mut served) = connected(&network).await;
            for kind in 0..100 {
                client.sender.try_send(encode_frame(kind, b"")).unwrap();
            }
            drain(&mut served.receiver).await
        };
        let first = run(9).await;
        assert_eq!(first, run(9).await, "same seed, same fate for every frame");
        let mut sorted = first.clone();
        sorted.sort();
        let mut unique = sorted.clone();
        unique.dedup();
        assert!(unique.len() < 100, "some frames were dropped");
        assert!(sorted.len() > unique.len(), "some frames were duplicated");
        assert_ne!(first, sorted, "some frames were reordered");
    }

    #[tokio::test(start_paused = true)]
    async fn partition_cuts_both_ways_until_healed() {
        let network = MemoryNetwork::new(3);
        let (client, mut served) = connected(&network).await;
        network.partition(&served.peer, "server");
        client.sender.try_send(encode_frame(1, b"")).unwrap();
        assert!(drain(&mut served.receiver).await.is_empty());
        network.heal();
        client.sender.try_send(encode_frame(2, b"")).unwrap();
        assert_eq!(drain(&mut served.receiver).await, vec![2]);
    }
}
