//! A throwaway OpenSSH server (Debian's `openssh-server`, which `scripts/test.sh` installs when
//! it is missing) on a free loopback port, for the SFTP tests.
//!
//! Everything it uses is under the directory the test gives: a fresh ed25519 host key, a
//! client key allowed to log in as the user the tests run as, a known-hosts file that holds
//! the host key, the configuration and the server's log. SFTP is served by sshd's built-in
//! `internal-sftp`, on the real file system: a test watches the destination directory with
//! `std::fs` while a client writes to it over SFTP. The server is stopped on drop.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs the server; sshd must be started by its absolute path.
pub const SSHD: &str = "/usr/sbin/sshd";

const START_WAIT_MAX: Duration = Duration::from_secs(20);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SshdError {
    /// The server is not installed.
    #[error("{SSHD} is missing: install Debian's openssh-server (scripts/test.sh does it)")]
    NotInstalled,
    /// A setup command failed.
    #[error("{what} failed: {detail}")]
    Setup {
        /// What was being done.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// The server did not come up.
    #[error("sshd did not start on port {port}: {reason}; its log is {}", log.display())]
    DidNotStart {
        /// The port it was given.
        port: u16,
        /// What was seen.
        reason: String,
        /// Its log.
        log: PathBuf,
    },
}

/// A running sshd serving SFTP on `127.0.0.1:port`.
#[derive(Debug)]
pub struct Sshd {
    /// The port it listens on.
    pub port: u16,
    /// The user the client key logs in as (the tests' own user).
    pub user: String,
    /// The client's private key (ed25519, no passphrase).
    pub client_key: PathBuf,
    /// A known-hosts file holding this server's host key under `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    /// The server's log.
    pub log: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Sshd {
    /// Generates the keys and configuration under `dir` (which must exist) and starts the
    /// server, trying again on another port if the one picked was taken meanwhile.
    pub fn start(dir: &Path) -> Result<Sshd, SshdError> {
        if !Path::new(SSHD).exists() {
            return Err(SshdError::NotInstalled);
        }
        let user = run("id -un", Command::new("id").arg("-un"))?;
        let user = user.trim().to_string();
        if rustix::process::geteuid().is_root() {
            // The privilege separation directory; it lives on a tmpfs and may be missing.
            std::fs::create_dir_all("/run/sshd").map_err(setup("creating /run/sshd"))?;
        }
        keygen(&dir.join("host_ed25519"))?;
        let client_key = dir.join("client_ed25519");
        keygen(&client_key)?;
        std::fs::copy(dir.join("client_ed25519.pub"), dir.join("authorized_keys"))
            .map_err(setup("writing authorized_keys"))?;
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(dir, &user, &client_key) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three attempts were made"))
    }

    fn start_once(dir: &Path, user: &str, client_key: &Path) -> Result<Sshd, SshdError> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(setup("finding a free loopback port"))?;
        let known_hosts = dir.join("known_hosts");
        let host_key = public_key(&dir.join("host_ed25519.pub"))?;
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}\n"))
            .map_err(setup("writing known_hosts"))?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {host}\n\
                 PidFile none\n\
                 AuthorizedKeysFile {keys}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 Subsystem sftp internal-sftp\n\
                 LogLevel VERBOSE\n",
                host = dir.join("host_ed25519").display(),
                keys = dir.join("authorized_keys").display(),
            ),
        )
        .map_err(setup("writing sshd_config"))?;
        let log = dir.join(format!("sshd-{port}.log"));
        let log_file = std::fs::File::create(&log).map_err(setup("creating the log"))?;
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(setup("sharing the log"))?)
            .stderr(log_file)
            .spawn()
            .map_err(setup("starting sshd"))?;
        let mut server = Sshd {
            port,
            user: user.into(),
            client_key: client_key.into(),
            known_hosts,
            log,
            dir: dir.into(),
            child,
        };
        server.wait_until_listening()?;
        tracing::info!(port, log = ?server.log, "sshd started");
        Ok(server)
    }

    fn wait_until_listening(&mut self) -> Result<(), SshdError> {
        let started = Instant::now();
        let listening = format!("Server listening on 127.0.0.1 port {}", self.port);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.did_not_start(format!("it exited with {status}")));
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(&listening)
                && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > START_WAIT_MAX {
                return Err(self.did_not_start(format!("not listening after {START_WAIT_MAX:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn did_not_start(&self, reason: String) -> SshdError {
        SshdError::DidNotStart {
            port: self.port,
            reason,
            log: self.log.clone(),
        }
    }

    /// A known-hosts file at `path` that records another ed25519 key for this server's
    /// address, as after a man-in-the-middle or a reinstalled server.
    pub fn wrong_known_hosts(&self, path: &Path) -> Result<PathBuf, SshdError> {
        let other = self.dir.join("other_host_ed25519");
        if !other.exists() {
            keygen(&other)?;
        }
        let key = public_key(&self.dir.join("other_host_ed25519.pub"))?;
        std::fs::write(path, format!("[127.0.0.1]:{} {key}\n", self.port))
            .map_err(setup("writing known_hosts"))?;
        Ok(path.into())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The listener only: each connection's own process ends when its client goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ssh-keygen` a fresh ed25519 key without passphrase at `path` (and `path.pub`).
fn keygen(path: &Path) -> Result<(), SshdError> {
    run(
        "ssh-keygen",
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "keel-test", "-f"])
            .arg(path),
    )
    .map(drop)
}

/// The algorithm and base64 fields of a `.pub` file.
fn public_key(path: &Path) -> Result<String, SshdError> {
    let text = std::fs::read_to_string(path).map_err(setup("reading a public key"))?;
    Ok(text.split(' ').take(2).collect::<Vec<_>>().join(" "))
}

fn run(what: &str, command: &mut Command) -> Result<String, SshdError> {
    let output = command.output().map_err(setup(what))?;
    if !output.status.success() {
        return Err(SshdError::Setup {
            what: what.into(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn setup(what: &str) -> impl Fn(std::io::Error) -> SshdError + '_ {
    move |e| SshdError::Setup {
        what: what.into(),
        detail: e.to_string(),
    }
}
