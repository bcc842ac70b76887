//! Serves the SQL engine over an in-memory store, for trying psql and
//! pgbench by hand:
//!
//! ```text
//! cargo run -p db-frontend --release --example sql_server -- 127.0.0.1:5433 [scale] [password]
//! pgbench -h 127.0.0.1 -p 5433 -U lab -n -T 10 postgres
//! ```
//!
//! With a scale the pgbench tables are loaded first; with a password,
//! SCRAM-SHA-256 is required for user `lab`, else anyone may connect.

use db_frontend::sql::kv::MemoryKv;
use db_frontend::sql::pgbench::init_pgbench;
use db_frontend::sql::server::{ServerConfig, serve};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:5433".to_owned());
    let scale: Option<u32> = args.next().map(|scale| scale.parse()).transpose()?;
    let config = match args.next() {
        Some(password) => ServerConfig::scram("lab", password),
        None => ServerConfig::trust(),
    };
    let store = MemoryKv::default();
    if let Some(scale) = scale {
        let started = std::time::Instant::now();
        let counts = init_pgbench(&store, scale).await?;
        eprintln!("loaded {counts:?} in {:?}", started.elapsed());
    }
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("serving on {address} ({:?})", config.auth);
    serve(listener, store, config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
