//! The client of the simulated cloud that steps and probes use, registered with the engine as
//! a resource, and the classification of the cloud's answers into step errors.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use keel_engine::{StepContext, StepError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::wire::{Reply, Request, Throttle};

/// How long one call may take before it counts as lost (retryable, in doubt).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept for reuse.
const IDLE_MAX: usize = 64;

/// A client of one simulated cloud, with a pool of loopback connections.
#[derive(Debug)]
pub struct SimClient {
    addr: SocketAddr,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
}

impl SimClient {
    /// A client of the cloud at `addr`, which must be a loopback address.
    pub fn new(addr: SocketAddr) -> SimClient {
        assert!(
            addr.ip().is_loopback(),
            "the simulated cloud is on loopback only, not {addr}"
        );
        SimClient {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The client registered with the engine that runs `ctx`'s step.
    pub fn of(ctx: &StepContext) -> Result<std::sync::Arc<SimClient>, StepError> {
        ctx.resource::<SimClient>().ok_or_else(|| {
            StepError::permanent(
                "no SimClient is registered with the engine (EngineBuilder::resource)",
            )
        })
    }

    /// Makes one call. A call whose connection fails is retryable: it may or may not have
    /// taken effect, as a lost response.
    pub async fn call(&self, request: &Request) -> Result<Reply, StepError> {
        let pooled = self.idle.lock().expect("idle lock").pop();
        let mut connection = match pooled {
            Some(c) => c,
            None => {
                let stream = TcpStream::connect(self.addr).await.map_err(|e| {
                    StepError::retryable(format!(
                        "connecting to the simulated cloud at {}",
                        self.addr
                    ))
                    .with_source(e)
                })?;
                let _ = stream.set_nodelay(true);
                BufReader::new(stream)
            }
        };
        let exchanged = tokio::time::timeout(CALL_TIMEOUT, exchange(&mut connection, request))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply within {CALL_TIMEOUT:?}"),
                ))
            });
        match exchanged {
            Ok(reply) => {
                let mut idle = self.idle.lock().expect("idle lock");
                if idle.len() < IDLE_MAX {
                    idle.push(connection);
                }
                Ok(reply)
            }
            Err(e) => Err(StepError::retryable(format!(
                "call {:?} to the simulated cloud lost",
                request.op()
            ))
            .with_source(e)),
        }
    }
}

async fn exchange(
    connection: &mut BufReader<TcpStream>,
    request: &Request,
) -> std::io::Result<Reply> {
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    connection.get_mut().write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    if connection.read_line(&mut answer).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the simulated cloud closed the connection",
        ));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

impl Reply {
    /// The step error for an answer the caller did not expect, saying what it was doing:
    /// throttling is [`StepError::throttled`], a resource not ready yet (or not found, as
    /// right after a create) is retryable, the rest is permanent.
    pub fn into_error(self, doing: &str) -> StepError {
        match self {
            Reply::Throttled { cause } => StepError::throttled(format!(
                "{doing}: throttled ({})",
                match cause {
                    Throttle::Capacity => "over the account's capacity",
                    Throttle::Random => "request limit exceeded",
                }
            )),
            Reply::IncorrectState { message } => {
                StepError::retryable(format!("{doing}: incorrect state: {message}"))
            }
            Reply::NotFound { id } => StepError::retryable(format!("{doing}: {id} not found")),
            Reply::Invalid { message } => StepError::permanent(format!("{doing}: {message}")),
            other => StepError::permanent(format!("{doing}: unexpected answer {other:?}")),
        }
    }
}
