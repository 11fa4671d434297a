//! The simulated cloud served on a free loopback port: one JSON request per line, one JSON
//! reply per line, any number of requests per connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::model::{Cloud, CloudConfig, GroundTruth};
use super::wire::{Reply, Request};

/// Milliseconds since the Unix epoch, the clock of the ground truth (the engine's journal
/// uses the same).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running simulated cloud. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct CloudServer {
    addr: SocketAddr,
    cloud: Arc<Mutex<Cloud>>,
    accept: JoinHandle<()>,
}

impl CloudServer {
    /// Starts a cloud with `config` on 127.0.0.1 and a free port. Must be called inside a
    /// tokio runtime, which serves it.
    pub async fn start(config: CloudConfig) -> std::io::Result<CloudServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let cloud = Arc::new(Mutex::new(Cloud::new(config, now_ms())));
        let served = Arc::clone(&cloud);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, Arc::clone(&served)));
            }
        });
        Ok(CloudServer {
            addr,
            cloud,
            accept,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the ground truth so far.
    pub fn truth(&self) -> GroundTruth {
        self.cloud.lock().expect("cloud lock").truth()
    }
}

impl Drop for CloudServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves one connection until the client closes it.
async fn serve(stream: TcpStream, cloud: Arc<Mutex<Cloud>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => cloud.lock().expect("cloud lock").handle(now_ms(), &request),
            Err(e) => Reply::Invalid {
                message: format!("malformed request: {e}"),
            },
        };
        let mut text = serde_json::to_string(&reply).expect("replies serialise");
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}
