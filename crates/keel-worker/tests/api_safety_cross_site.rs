//! The worker against a hostile web page and a hostile neighbour (docs/api.md "Safety"): what a
//! page can send (no JSON type, no token or a wrong one, a foreign or null origin, a rebound host
//! name) is refused even on loopback, the token is the worker's own, and `--no-auth`, a given token
//! and an allowed host name do what they say. A real `keel worker` is reached by raw HTTP and the
//! CLI; moto is read for what the refused requests did not create.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    addr, error, http, keel, refused, refused_start, role, roles, worker, worker_command, KEEL,
};
use keel_testkit::demo::{self, Worker};
use keel_testkit::moto::TestAccount;
use serde_json::json;

/// What a web page can send (no JSON type, no token or a wrong one, a foreign or null origin,
/// a rebound host name) cannot start, cancel or read a run, even on loopback, and creates
/// nothing; the worker's own page with the token can.
#[test]
fn a_web_page_cannot_start_cancel_or_read_runs_and_even_loopback_needs_the_token() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = worker(&data, &account, &account.endpoint, &[]);
    let at = addr(&w);
    let host = format!("Host: {at}");
    // The worker made its token, owner-only, at its first start.
    let token_file = data.join("api-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let token = w.token();
    assert_eq!(token.len(), 64, "32 random bytes in hex");
    let bearer = format!("Authorization: Bearer {token}");
    let start = json!({"workflow": "iam.service-role", "id": "evil", "input": role("evil-admin")})
        .to_string();

    // What a page's form or fetch can send without a CORS preflight: text/plain, no type.
    let post = "POST /v1/runs HTTP/1.1";
    for content_type in [
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
    ] {
        let head = format!("{post}\r\n{host}\r\n{bearer}\r\n{content_type}");
        error(http(&at, &head, &start), 415, "unsupported_media_type");
    }
    error(
        http(&at, &format!("{post}\r\n{host}\r\n{bearer}"), &start),
        415,
        "unsupported_media_type",
    );
    // No token, even on loopback.
    let json_type = "Content-Type: application/json";
    let line = error(
        http(&at, &format!("{post}\r\n{host}\r\n{json_type}"), &start),
        401,
        "unauthorised",
    );
    assert!(line.contains("api-token"), "{line}");
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\nAuthorization: Bearer nope\r\n{json_type}"),
            &start,
        ),
        401,
        "unauthorised",
    );
    // A page's origin, or a name rebound to 127.0.0.1.
    let evil_origin = "Origin: http://evil.example";
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\n{bearer}\r\n{json_type}\r\n{evil_origin}"),
            &start,
        ),
        403,
        "cross_origin",
    );
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\n{bearer}\r\n{json_type}\r\nOrigin: null"),
            &start,
        ),
        403,
        "cross_origin",
    );
    let port = at.rsplit(':').next().unwrap();
    let rebound = format!("Host: evil.example:{port}");
    error(
        http(
            &at,
            &format!("GET /v1/runs HTTP/1.1\r\n{rebound}\r\n{bearer}"),
            "",
        ),
        421,
        "wrong_host",
    );
    error(
        http(
            &at,
            &format!("{post}\r\n{rebound}\r\n{bearer}\r\n{json_type}"),
            &start,
        ),
        421,
        "wrong_host",
    );
    error(http(&at, "GET /v1/runs HTTP/1.1", ""), 421, "wrong_host");
    // A cancel needs a JSON body too.
    let cancel = "POST /v1/runs/evil/cancel HTTP/1.1";
    error(
        http(&at, &format!("{cancel}\r\n{host}\r\n{bearer}"), ""),
        415,
        "unsupported_media_type",
    );
    error(
        http(
            &at,
            &format!("{cancel}\r\n{host}\r\n{bearer}\r\n{json_type}"),
            "",
        ),
        400,
        "malformed_request",
    );
    // None of that stored or created anything.
    let (status, page) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\n{host}\r\n{bearer}"),
        "",
    );
    assert_eq!(
        (status, page["runs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );
    assert!(roles(&account).is_empty());

    // The worker's own page (same origin), `localhost`, and a lowercase scheme are fine.
    let same_origin = format!("Origin: http://{at}");
    let head = format!(
        "{post}\r\n{host}\r\nAuthorization: bearer {token}\r\n{json_type}\r\n{same_origin}"
    );
    let (status, record) = http(&at, &head, &start);
    assert_eq!(status, 200, "{record}");
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs/evil HTTP/1.1\r\nHost: localhost:{port}\r\n{bearer}"),
        "",
    );
    assert_eq!(status, 200);
    let head = format!("{cancel}\r\n{host}\r\n{bearer}\r\n{json_type}");
    let (status, cancelled) = http(&at, &head, "{}");
    assert_eq!(status, 200, "{cancelled}");
    // Health answers without the token (it says nothing).
    let (status, health) = http(&at, &format!("GET /v1/health HTTP/1.1\r\n{host}"), "");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    // The CLI reads the token from the data directory; without it, one clear line.
    let out = keel(&w, &["--json", "status", "evil"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(KEEL)
        .args(["--api", &w.api, "--data-dir"])
        .arg(dir.path().join("elsewhere"))
        .args(["status", "evil"])
        .env_remove("KEEL_API_TOKEN")
        .output()
        .unwrap();
    refused(&out, 2, "missing or wrong API token");
    // Another user who took the worker's port does not get the token.
    decoy_listener_gets_no_token(&w, &token);
    // A token file others can read is refused, by the CLI and by the worker.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = keel(&w, &["status", "evil"]);
    refused(&out, 2, "mode 0644");
    drop(w);
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "mode 0644");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // `--no-auth` is for loopback only, and still checks Host, Origin and the body's type.
    let out = refused_start(
        demo::worker_command(
            Path::new(KEEL),
            &data,
            &account,
            &account.endpoint,
            "0.0.0.0:0",
        )
        .arg("--no-auth"),
    );
    refused(&out, 2, "--no-auth is for loopback");
    let w = worker(&data, &account, &account.endpoint, &["--no-auth"]);
    let at = addr(&w);
    let host = format!("Host: {at}");
    let (status, _) = http(&at, &format!("GET /v1/runs/evil HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200);
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\nContent-Type: text/plain"),
            &start,
        ),
        415,
        "unsupported_media_type",
    );
    error(
        http(
            &at,
            &format!(
                "GET /v1/runs HTTP/1.1\r\nHost: evil.example:{}",
                at.rsplit(':').next().unwrap()
            ),
            "",
        ),
        421,
        "wrong_host",
    );
    // A token given to the worker is used instead of the data directory's.
    drop(w);
    let mut given = worker_command(&data, &account, &account.endpoint, &[]);
    given.env("KEEL_API_TOKEN", "given-token-0123456789");
    let w = Worker::start(given, &data).unwrap();
    let at = addr(&w);
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer {token}"),
        "",
    );
    assert_eq!(
        status, 401,
        "the data directory's token is not the one in use"
    );
    let (status, _) = http(
        &at,
        &format!(
            "GET /v1/runs HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer given-token-0123456789"
        ),
        "",
    );
    assert_eq!(status, 200);
    // A configured name is let through.
    drop(w);
    let w = worker(
        &data,
        &account,
        &account.endpoint,
        &["--allowed-host", "Keel.Internal"],
    );
    let at = addr(&w);
    let bearer = format!("Authorization: Bearer {}", w.token());
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\nHost: keel.internal\r\n{bearer}"),
        "",
    );
    assert_eq!(status, 200);
}

/// With the worker stopped, another user (uid 65534) listens on its port; the CLI refuses to
/// send the token there, and the decoy receives nothing. Needs root to run the decoy as
/// another user; skipped otherwise.
fn decoy_listener_gets_no_token(w: &Worker, token: &str) {
    if rustix::process::geteuid().as_raw() != 0 {
        tracing::warn!("not root: the decoy-listener check is skipped");
        return;
    }
    let (host, port) = addr(w)
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let stopped = Worker {
        child: std::process::Command::new("true").spawn().unwrap(),
        api: w.api.clone(),
        data: w.data.clone(),
    };
    // The real worker stops (killed: its port is free at once).
    let pid = w.child.id();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // perl is part of every Debian system (perl-base) and runs as any user.
    let script = r#"
        use IO::Socket::INET;
        my $s = IO::Socket::INET->new(LocalAddr => $ARGV[0], LocalPort => $ARGV[1],
            Listen => 8, ReuseAddr => 1) or die "bind: $!";
        $| = 1; print "ready\n";
        my $got = "";
        eval {
            local $SIG{ALRM} = sub { die "timeout\n" };
            alarm 5; my $c = $s->accept(); alarm 2; $c->recv($got, 65536); alarm 0;
        };
        $got =~ s/\n/ /g; print length($got), " ", $got, "\n";
    "#;
    let mut decoy = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "perl",
            "-e",
            script,
        ])
        .args([&host, &port])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(decoy.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let cli = keel(&stopped, &["status", "evil"]);
    refused(&cli, 1, "held by another user");
    let mut heard = String::new();
    std::io::Read::read_to_string(&mut out, &mut heard).unwrap();
    decoy.wait().unwrap();
    assert!(!heard.contains(token), "the decoy got the token: {heard}");
    assert!(heard.starts_with('0'), "the decoy got a request: {heard}");
}
