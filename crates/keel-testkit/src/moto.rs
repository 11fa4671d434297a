//! moto's server (PyPI `moto[server]`), the AWS emulator every AWS test runs against.
//!
//! [`MotoServer::shared`] starts one server per test process on a free loopback port, the first
//! time a test asks for it, and keeps it for the rest of the process; the server exits by itself
//! when the process ends (the launcher watches its standard input), including when a test
//! binary is killed. Tests share the server without sharing state: each asks for its own
//! [`TestAccount`], a fresh AWS account id inside moto (moto keys all of its state by account),
//! so no test resets or sees another test's resources. [`MotoServer::reset`] is there for a
//! test that owns a server of its own.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::aws::Credentials;

/// What to install when moto is missing, repeated in every error that needs it.
pub const INSTALL_HINT: &str = "install moto's server with: python3 -m pip install 'moto[server]'";

/// How long a fresh server may take to answer (importing moto takes a few seconds).
const START_WAIT_MAX: Duration = Duration::from_secs(60);

/// Errors from starting or talking to moto's server.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// The Python interpreter could not be run at all.
    #[error("cannot run {python:?} to start moto's server ({source}); {INSTALL_HINT}")]
    NoPython {
        /// The interpreter that was tried.
        python: PathBuf,
        /// Why it could not run.
        source: std::io::Error,
    },
    /// Python ran, but moto's server could not be imported.
    #[error("moto's server is not installed for {python:?}; {INSTALL_HINT}\n{stderr}")]
    NotInstalled {
        /// The interpreter that was tried.
        python: PathBuf,
        /// What Python said.
        stderr: String,
    },
    /// The server exited or never answered.
    #[error("moto's server did not start on {addr}: {reason}; its log is {log:?}")]
    DidNotStart {
        /// Where it was asked to listen.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
        /// The server's own output.
        log: PathBuf,
    },
    /// A control request (reset, config, account) failed.
    #[error("moto's server at {addr} answered {what} with: {detail}")]
    Control {
        /// The server.
        addr: SocketAddr,
        /// The request.
        what: &'static str,
        /// The status line or I/O error.
        detail: String,
    },
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct MotoOptions {
    /// The Python interpreter (default: `$KEEL_MOTO_PYTHON` or `python3`).
    pub python: PathBuf,
    /// Arguments given to Python before the launcher (for example `-S`).
    pub python_args: Vec<String>,
}

impl Default for MotoOptions {
    fn default() -> Self {
        let python = std::env::var_os("KEEL_MOTO_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("python3"));
        Self {
            python,
            python_args: Vec::new(),
        }
    }
}

/// A running moto server. Dropping it stops the server.
#[derive(Debug)]
pub struct MotoServer {
    addr: SocketAddr,
    child: Mutex<Child>,
    // Held open for the server's lifetime: closing it tells the launcher to exit.
    _stdin: ChildStdin,
    log: PathBuf,
}

impl MotoServer {
    /// The server shared by every test of this process, started on first use.
    pub fn shared() -> Result<&'static MotoServer, MotoError> {
        static SHARED: OnceLock<Result<MotoServer, String>> = OnceLock::new();
        let started = SHARED
            .get_or_init(|| MotoServer::start(MotoOptions::default()).map_err(|e| e.to_string()));
        started.as_ref().map_err(|reason| MotoError::DidNotStart {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            reason: format!("the first start in this process failed: {reason}"),
            log: PathBuf::new(),
        })
    }

    /// Starts a server of its own on a free loopback port and waits until it answers.
    pub fn start(options: MotoOptions) -> Result<MotoServer, MotoError> {
        // A port picked by binding to port 0 can be taken by someone else before moto binds it;
        // a second try with a new port covers that race.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(&options) {
                Ok(server) => return Ok(server),
                Err(e @ (MotoError::NoPython { .. } | MotoError::NotInstalled { .. })) => {
                    return Err(e)
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three attempts were made"))
    }

    fn start_once(options: &MotoOptions) -> Result<MotoServer, MotoError> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| MotoError::DidNotStart {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                reason: format!("no free loopback port: {e}"),
                log: PathBuf::new(),
            })?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = std::env::temp_dir().join(format!("keel-moto-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).map_err(|e| MotoError::DidNotStart {
            addr,
            reason: format!("cannot create the log file: {e}"),
            log: log.clone(),
        })?;
        let mut child = Command::new(&options.python)
            .args(&options.python_args)
            .arg("-c")
            .arg(include_str!("moto_launcher.py"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // AWS-managed IAM policies (for AttachRolePolicy with an AWS policy ARN) load only
            // with this set.
            .env("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().map_err(|e| MotoError::DidNotStart {
                addr,
                reason: format!("cannot share the log file: {e}"),
                log: log.clone(),
            })?)
            .stderr(log_file)
            .spawn()
            .map_err(|source| MotoError::NoPython {
                python: options.python.clone(),
                source,
            })?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let server = MotoServer {
            addr,
            child: Mutex::new(child),
            _stdin: stdin,
            log,
        };
        // The launcher also makes IoT certificate ids the SHA-256 of the DER, as in AWS.
        server.wait_until_answering(options)?;
        tracing::info!(%addr, log = ?server.log, "moto server started");
        Ok(server)
    }

    fn wait_until_answering(&self, options: &MotoOptions) -> Result<(), MotoError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .lock()
                .expect("child lock")
                .try_wait()
                .ok()
                .flatten()
            {
                let output = std::fs::read_to_string(&self.log).unwrap_or_default();
                if status.code() == Some(3) || output.contains("No module named") {
                    return Err(MotoError::NotInstalled {
                        python: options.python.clone(),
                        stderr: output.trim().to_string(),
                    });
                }
                return Err(MotoError::DidNotStart {
                    addr: self.addr,
                    reason: format!("it exited with {status}"),
                    log: self.log.clone(),
                });
            }
            if self.control("POST", "/moto-api/reset", "", "reset").is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_WAIT_MAX {
                return Err(MotoError::DidNotStart {
                    addr: self.addr,
                    reason: format!("no answer within {START_WAIT_MAX:?}"),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's base URL, for example `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forgets every resource in every account (moto's reset endpoint). Only for a server a
    /// test owns: on the shared server, use a fresh [`TestAccount`] instead.
    pub fn reset(&self) -> Result<(), MotoError> {
        self.control("POST", "/moto-api/reset", "", "reset")
    }

    /// A fresh AWS account inside moto, with credentials that select it.
    ///
    /// moto keeps its state per account id and maps the access keys that STS hands out to the
    /// account of the assumed role; assuming a role in a new account id gives a test its own
    /// empty world on the shared server.
    pub fn new_account(&self) -> Result<TestAccount, MotoError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // 12 digits: 2 fixed, 6 from the process id, 4 from a counter.
        let account_id = format!("10{:06}{:04}", std::process::id() % 1_000_000, n % 10_000);
        let body = format!(
            "Action=AssumeRole&Version=2011-06-15&RoleSessionName=keel-test&RoleArn=arn%3Aaws%3Aiam%3A%3A{account_id}%3Arole%2Fkeel-test"
        );
        let (status, answer) = self.http(
            "POST",
            "/",
            &body,
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIAKEELTESTROOT/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=0",
                ),
            ],
        )
        .map_err(|e| self.control_error("account", e.to_string()))?;
        if status != 200 {
            return Err(self.control_error("account", format!("status {status}: {answer}")));
        }
        let field = |name: &str| {
            xml_text(&answer, name)
                .ok_or_else(|| self.control_error("account", format!("no <{name}> in {answer}")))
        };
        Ok(TestAccount {
            account_id,
            endpoint: self.endpoint(),
            credentials: Credentials {
                access_key_id: field("AccessKeyId")?,
                secret_access_key: field("SecretAccessKey")?,
                session_token: Some(field("SessionToken")?),
            },
        })
    }

    fn control(
        &self,
        method: &str,
        path: &str,
        body: &str,
        what: &'static str,
    ) -> Result<(), MotoError> {
        match self.http(method, path, body, &[("Content-Type", "application/json")]) {
            Ok((status, _)) if (200..300).contains(&status) => Ok(()),
            Ok((status, answer)) => {
                Err(self.control_error(what, format!("status {status}: {answer}")))
            }
            Err(e) => Err(self.control_error(what, e.to_string())),
        }
    }

    fn control_error(&self, what: &'static str, detail: String) -> MotoError {
        MotoError::Control {
            addr: self.addr,
            what,
            detail,
        }
    }

    /// One HTTP/1.1 request on its own connection; returns the status and the body.
    fn http(
        &self,
        method: &str,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:.80}")))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The text of the first `<name>...</name>` element (enough for moto's STS answers).
fn xml_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].to_string())
}

/// One AWS account inside moto: its id, and credentials that select it.
#[derive(Debug, Clone)]
pub struct TestAccount {
    /// The 12-digit account id.
    pub account_id: String,
    /// moto's base URL.
    pub endpoint: String,
    /// Credentials that moto maps to this account.
    pub credentials: Credentials,
}

impl TestAccount {
    /// A fresh account on the shared server: the usual first line of an AWS test.
    pub fn fresh() -> Result<TestAccount, MotoError> {
        MotoServer::shared()?.new_account()
    }

    /// An SDK configuration for this account that talks to moto directly.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        crate::aws::sdk_config(
            &self.endpoint,
            &self.credentials,
            crate::aws::SdkOptions::default(),
        )
        .await
    }

    /// An SDK configuration for this account that talks to `endpoint` (a fault proxy in front
    /// of moto) with the given options.
    pub async fn sdk_config_via(
        &self,
        endpoint: &str,
        options: crate::aws::SdkOptions,
    ) -> aws_config::SdkConfig {
        crate::aws::sdk_config(endpoint, &self.credentials, options).await
    }

    /// The environment that hands this account, reached through `endpoint` (a fault proxy),
    /// to a crash-test child; the child reads it back with [`TestAccount::child_sdk_config`].
    pub fn child_env(&self, endpoint: &str) -> Vec<(String, String)> {
        vec![
            ("KEEL_TEST_ENDPOINT".into(), endpoint.into()),
            (
                "KEEL_TEST_ACCESS_KEY".into(),
                self.credentials.access_key_id.clone(),
            ),
            (
                "KEEL_TEST_SECRET_KEY".into(),
                self.credentials.secret_access_key.clone(),
            ),
        ]
    }

    /// In a crash-test child: the SDK configuration [`TestAccount::child_env`] handed over.
    /// Panics naming the variable that is missing.
    pub async fn child_sdk_config() -> aws_config::SdkConfig {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let credentials = Credentials {
            access_key_id: var("KEEL_TEST_ACCESS_KEY"),
            secret_access_key: var("KEEL_TEST_SECRET_KEY"),
            session_token: None,
        };
        crate::aws::sdk_config(
            &var("KEEL_TEST_ENDPOINT"),
            &credentials,
            crate::aws::SdkOptions::default(),
        )
        .await
    }
}
