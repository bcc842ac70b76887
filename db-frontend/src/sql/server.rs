//! The PostgreSQL wire protocol server, over any [`KvStore`].
//!
//! `pgwire` does the protocol: startup, authentication, message framing,
//! portals and the extended-query state machine. This module plugs the
//! engine into it:
//!
//! - Each accepted connection gets its own handler set holding one
//!   [`Session`], so a connection is a session. When the connection
//!   ends, the session's open block is rolled back.
//! - The simple query protocol runs the query string through
//!   [`Session::execute_sql`]; every statement answers with its own
//!   result or error.
//! - The extended protocol parses at Parse (syntax errors surface
//!   there), answers Describe by planning the statement against the
//!   catalog ([`Session::describe`]: parameter types inferred where the
//!   client gave none, result columns typed INT4/INT8/TEXT/BOOL), and
//!   at Execute decodes the bound parameters (text or binary) and runs.
//! - Authentication is `trust` (anyone) or SCRAM-SHA-256 against the one
//!   user of [`ServerConfig`], whose salted password is computed once.
//! - At most [`ServerConfig::max_connections`] sessions at a time; the
//!   next client is refused at startup with `53300`.
//!
//! No TLS: SCRAM runs without channel binding.

use std::fmt::Debug;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, stream};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password};
use pgwire::api::auth::{self, AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::process_socket;
use sqlparser::ast::Statement;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::error::{SqlError, sqlstate};
use super::exec::Outcome;
use super::kv::KvStore;
use super::plan::{self, OutputColumn};
use super::session::{Params, Session, WireParam};
use super::types::{DataType, Value};

/// The default limit on sessions served at once.
pub const CONNECTIONS_MAX: usize = 64;
/// PBKDF2 iterations of the SCRAM salted password (PostgreSQL's default).
pub const SCRAM_ITERATIONS: usize = 4096;
/// Bytes of SCRAM salt.
const SCRAM_SALT_BYTES: usize = 16;

/// How clients authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone, without a password.
    Trust,
    /// The configured user with the configured password, SCRAM-SHA-256.
    ScramSha256,
}

/// The server's settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The one user SCRAM accepts (ignored under `Trust`).
    pub user: String,
    pub password: String,
    pub auth: AuthMode,
    /// Sessions served at once; one more is refused with `53300`.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Anyone may connect, no password.
    pub fn trust() -> ServerConfig {
        ServerConfig {
            user: String::new(),
            password: String::new(),
            auth: AuthMode::Trust,
            max_connections: CONNECTIONS_MAX,
        }
    }

    /// `user` with `password`, checked with SCRAM-SHA-256.
    pub fn scram(user: impl Into<String>, password: impl Into<String>) -> ServerConfig {
        ServerConfig {
            user: user.into(),
            password: password.into(),
            auth: AuthMode::ScramSha256,
            max_connections: CONNECTIONS_MAX,
        }
    }
}

/// Serves PostgreSQL clients on `listener` until `shutdown` completes;
/// then stops accepting and drops every connection (rolling back their
/// open blocks).
pub async fn serve<S, F>(listener: TcpListener, store: S, config: ServerConfig, shutdown: F) -> io::Result<()>
where
    S: KvStore,
    F: Future<Output = ()> + Send,
{
    let startup = Arc::new(Startup::new(&config));
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a SQL connection failed");
                        continue;
                    }
                };
                if let Err(error) = socket.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY");
                }
                let permit = slots.clone().try_acquire_owned().ok();
                let startup = if permit.is_some() { startup.clone() } else { Arc::new(Startup::Refuse) };
                let connection = Arc::new(Connection::new(store.clone()));
                connections.spawn(async move {
                    let _permit = permit;
                    let handlers = Handlers { connection: connection.clone(), startup };
                    if let Err(error) = process_socket(socket, None, handlers).await {
                        tracing::debug!(%error, %peer, "SQL connection ended with an error");
                    }
                    if let Err(error) = connection.session.lock().await.close().await {
                        tracing::warn!(%error, %peer, "rolling back a closed connection's transaction failed");
                    }
                });
            }
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// A running server: its address, and the way to stop it.
#[derive(Debug)]
pub struct ServerHandle {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl ServerHandle {
    /// Stops the server and waits until every connection is gone.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(()); // the server may be gone already
        }
        (&mut self.task).await.map_err(io::Error::other)?
    }
}

/// Starts [`serve`] on a task.
pub fn spawn<S: KvStore>(listener: TcpListener, store: S, config: ServerConfig) -> io::Result<ServerHandle> {
    let address = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, store, config, async move {
        let _ = stopped.await; // a dropped handle stops the server too
    }));
    Ok(ServerHandle { address, stop: Some(stop), task })
}

/// The SCRAM password source: one user, one salted password.
#[derive(Debug)]
struct ScramUser {
    user: String,
    salt: Vec<u8>,
    salted_password: Vec<u8>,
}

#[async_trait]
impl AuthSource for ScramUser {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        if login.user() != Some(self.user.as_str()) {
            return Err(PgWireError::InvalidPassword(login.user().unwrap_or_default().to_owned()));
        }
        Ok(Password::new(Some(self.salt.clone()), self.salted_password.clone()))
    }
}

/// Salt bytes from the standard library's per-process random hash keys.
fn random_salt() -> Vec<u8> {
    let mut salt = Vec::with_capacity(SCRAM_SALT_BYTES);
    let state = std::collections::hash_map::RandomState::new();
    let mut counter = 0u64;
    while salt.len() < SCRAM_SALT_BYTES {
        let mut hasher = state.build_hasher();
        hasher.write_u64(counter);
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        salt.extend_from_slice(&hasher.finish().to_le_bytes());
        counter += 1;
    }
    salt.truncate(SCRAM_SALT_BYTES);
    salt
}

/// The startup phase: trust, SCRAM, or a refusal (too many connections).
enum Startup {
    Trust(Arc<DefaultServerParameterProvider>),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
    Refuse,
}

impl Startup {
    fn new(config: &ServerConfig) -> Startup {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = super::SERVER_VERSION.to_owned();
        let parameters = Arc::new(parameters);
        match config.auth {
            AuthMode::Trust => Startup::Trust(parameters),
            AuthMode::ScramSha256 => {
                let salt = random_salt();
                let salted_password = gen_salted_password(&config.password, &salt, SCRAM_ITERATIONS);
                let source = ScramUser { user: config.user.clone(), salt, salted_password };
                let mut scram = ScramAuth::new(Arc::new(source));
                scram.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(Box::new(SASLAuthStartupHandler::new(parameters).with_scram(scram)))
            }
        }
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Trust(parameters) => {
                // Everything pgwire's no-op handler does, with our parameters.
                if let PgWireFrontendMessage::Startup(startup) = &message {
                    auth::protocol_negotiation(client, startup).await?;
                    auth::save_startup_parameters_to_metadata(client, startup);
                    auth::finish_authentication(client, parameters.as_ref()).await?;
                }
                Ok(())
            }
            Startup::Scram(scram) => scram.on_startup(client, message).await,
            Startup::Refuse => Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".to_owned(),
                sqlstate::TOO_MANY_CONNECTIONS.to_owned(),
                "sorry, too many clients already".to_owned(),
            )))),
        }
    }
}

/// One connection's state: its session.
struct Connection<S: KvStore> {
    session: Mutex<Session<S>>,
    parser: Arc<StatementParser>,
}

impl<S: KvStore> Connection<S> {
    fn new(store: S) -> Connection<S> {
        Connection { session: Mutex::new(Session::new(store)), parser: Arc::new(StatementParser) }
    }
}

/// The handler set pgwire asks for, per connection.
struct Handlers<S: KvStore> {
    connection: Arc<Connection<S>>,
    startup: Arc<Startup>,
}

impl<S: KvStore> PgWireServerHandlers for Handlers<S> {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.connection.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.connection.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// The client-facing form of an engine error.
fn error_info(error: SqlError) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_owned(), error.code.to_owned(), error.message)
}

fn user_error(error: SqlError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(error)))
}

/// The wire type of a result column or parameter.
pub fn wire_type(data_type: DataType) -> Type {
    match data_type {
        DataType::Int => Type::INT4,
        DataType::BigInt => Type::INT8,
        DataType::Text => Type::TEXT,
        DataType::Bool => Type::BOOL,
    }
}

/// The engine type for a parameter type the client declared; `None`
/// when it left it to the server.
fn declared_type(declared: Option<&Type>) -> Result<Option<DataType>, SqlError> {
    let Some(declared) = declared else {
        return Ok(None);
    };
    match *declared {
        Type::INT2 | Type::INT4 => Ok(Some(DataType::Int)),
        Type::INT8 => Ok(Some(DataType::BigInt)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::TIMESTAMP => Ok(Some(DataType::Text)),
        Type::BOOL => Ok(Some(DataType::Bool)),
        Type::UNKNOWN => Ok(None),
        ref other => Err(SqlError::unsupported(format!("the parameter type {}", other.name()))),
    }
}

fn fields(columns: &[OutputColumn], format: &Format) -> Arc<Vec<FieldInfo>> {
    Arc::new(
        columns
            .iter()
            .enumerate()
            .map(|(index, column)| {
                FieldInfo::new(column.name.clone(), None, None, wire_type(column.data_type), format.format_for(index))
            })
            .collect(),
    )
}

/// The pgwire response for an outcome.
fn response(outcome: Outcome, format: &Format) -> PgWireResult<Response> {
    Ok(match outcome {
        Outcome::Rows { columns, rows } => {
            let fields = fields(&columns, format);
            let mut encoder = DataRowEncoder::new(fields.clone());
            let mut encoded = Vec::with_capacity(rows.len());
            for row in rows {
                for value in row {
                    match value {
                        Value::Null => encoder.encode_field(&None::<i32>)?,
                        Value::Int(number) => encoder.encode_field(&number)?,
                        Value::BigInt(number) => encoder.encode_field(&number)?,
                        Value::Text(text) => encoder.encode_field(&text)?,
                        Value::Bool(flag) => encoder.encode_field(&flag)?,
                    }
                }
                encoded.push(Ok(encoder.take_row()));
            }
            Response::Query(QueryResponse::new(fields, stream::iter(encoded)))
        }
        Outcome::Inserted(count) => Response::Execution(Tag::new("INSERT").with_oid(0).with_rows(count)),
        Outcome::Updated(count) => Response::Execution(Tag::new("UPDATE").with_rows(count)),
        Outcome::Deleted(count) => Response::Execution(Tag::new("DELETE").with_rows(count)),
        Outcome::Command(tag) => Response::Execution(Tag::new(tag)),
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
        Outcome::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
    })
}

#[async_trait]
impl<S: KvStore> SimpleQueryHandler for Connection<S> {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let results = self.session.lock().await.execute_sql(query).await;
        results
            .into_iter()
            .map(|result| match result {
                Ok(outcome) => response(outcome, &Format::UnifiedText),
                Err(error) => Ok(Response::Error(Box::new(error_info(error)))),
            })
            .collect()
    }
}

/// Parses a Parse message's SQL: exactly one statement.
#[derive(Debug)]
struct StatementParser;

#[async_trait]
impl QueryParser for StatementParser {
    type Statement = Statement;

    async fn parse_sql<C>(&self, _client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = plan::parse(sql).map_err(user_error)?;
        match statements.len() {
            0 => Ok(None),
            1 => Ok(statements.pop()),
            _ => Err(user_error(SqlError::syntax("cannot insert multiple commands into a prepared statement"))),
        }
    }

    fn get_parameter_types(&self, _statement: &Statement) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new()) // Describe is answered by the handler, with the catalog
    }

    fn get_result_schema(&self, _statement: &Statement, _format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

impl<S: KvStore> Connection<S> {
    fn declared(types: &[Option<Type>]) -> PgWireResult<Vec<Option<DataType>>> {
        types.iter().map(|declared| declared_type(declared.as_ref())).collect::<Result<_, _>>().map_err(user_error)
    }
}

#[async_trait]
impl<S: KvStore> ExtendedQueryHandler for Connection<S> {
    type Statement = Statement;
    type QueryParser = StatementParser;

    fn query_parser(&self) -> Arc<StatementParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let given = Self::declared(&target.parameter_types)?;
        let description = self.session.lock().await.describe(&target.statement, &given).await.map_err(user_error)?;
        let params = description
            .params
            .iter()
            .enumerate()
            .map(|(index, &inferred)| match target.parameter_types.get(index) {
                Some(Some(declared)) if *declared != Type::UNKNOWN => declared.clone(),
                _ => wire_type(inferred),
            })
            .collect();
        let fields = fields(&description.columns, &Format::UnifiedText);
        Ok(DescribeStatementResponse::new(params, fields.as_ref().clone()))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let given = Self::declared(&portal.statement.parameter_types)?;
        let description =
            self.session.lock().await.describe(&portal.statement.statement, &given).await.map_err(user_error)?;
        Ok(DescribePortalResponse::new(fields(&description.columns, &portal.result_column_format).as_ref().clone()))
    }

    async fn do_query<C>(&self, _client: &mut C, portal: &Portal<Statement>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let given = Self::declared(&portal.statement.parameter_types)?;
        let params = portal
            .parameters
            .iter()
            .enumerate()
            .map(|(index, bytes)| WireParam {
                bytes: bytes.as_ref().map(|bytes| bytes.to_vec()),
                binary: portal.parameter_format.is_binary(index),
            })
            .collect();
        let outcome = self
            .session
            .lock()
            .await
            .execute(&portal.statement.statement, Params::Wire { params, given })
            .await
            .map_err(user_error)?;
        response(outcome, &portal.result_column_format)
    }
}
