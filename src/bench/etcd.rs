//! etcd as the peer for `lab bench locks`: a single etcd started from the
//! system's `etcd` binary (Debian's `etcd-server`) in a temp dir, driven
//! through its v3 JSON gateway (`/v3/lease/grant`, `/v3/lock/lock`,
//! `/v3/lock/unlock`) over plain HTTP/1.1 keep-alive connections, so the
//! loops are the same shape as the kit's and no client crate is needed.
//!
//! etcd runs with its defaults: every lock and unlock is a raft entry
//! fsync'ed to its WAL before the answer.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer its health check after starting.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Lease time-to-live of every lock client, in seconds.
const LEASE_TTL_SECONDS: u64 = 60;

/// A running etcd; killed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    pub client_port: u16,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd with its data in `directory`; `None` if there is no
    /// `etcd` binary on this machine.
    pub fn start(directory: &Path) -> Result<Option<Etcd>> {
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let spawned = Command::new("etcd")
            .arg("--data-dir")
            .arg(directory)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).context("starting etcd"),
        };
        let etcd = Etcd { child, client_port };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut client) = EtcdClient::connect(client_port)
                && client.request("GET", "/health", "").is_ok()
            {
                return Ok(Some(etcd));
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer its health check within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP connection to etcd's JSON gateway, holding a lease.
#[derive(Debug)]
pub struct EtcdClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    lease: String,
}

impl EtcdClient {
    fn connect(port: u16) -> Result<EtcdClient> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(EtcdClient { reader: BufReader::new(stream.try_clone()?), writer: stream, lease: String::new() })
    }

    /// A client with a lease of its own, as each lock holder needs.
    pub fn with_lease(port: u16) -> Result<EtcdClient> {
        let mut client = EtcdClient::connect(port)?;
        let granted = client.request("POST", "/v3/lease/grant", &format!("{{\"TTL\":{LEASE_TTL_SECONDS}}}"))?;
        client.lease = granted["ID"].as_str().context("lease grant without an ID")?.to_string();
        Ok(client)
    }

    /// Blocks until the lock `name` is held; returns the key to unlock with.
    pub fn lock(&mut self, name: &str) -> Result<String> {
        let name = base64::engine::general_purpose::STANDARD.encode(name);
        let body = format!("{{\"name\":\"{name}\",\"lease\":\"{}\"}}", self.lease);
        let locked = self.request("POST", "/v3/lock/lock", &body)?;
        Ok(locked["key"].as_str().context("lock answer without a key")?.to_string())
    }

    pub fn unlock(&mut self, key: &str) -> Result<()> {
        self.request("POST", "/v3/lock/unlock", &format!("{{\"key\":\"{key}\"}}"))?;
        Ok(())
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Result<Value> {
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("etcd answered {path} with {}", status.trim());
        }
        let (mut length, mut chunked) = (None, false);
        loop {
            let mut header = String::new();
            self.reader.read_line(&mut header)?;
            let header = header.trim();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = Some(value.trim().parse::<usize>()?);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut payload = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16)?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                payload.extend_from_slice(&chunk[..size]);
            }
        } else {
            payload.resize(length.context("etcd answer without a length")?, 0);
            self.reader.read_exact(&mut payload)?;
        }
        Ok(serde_json::from_slice(&payload)?)
    }
}
