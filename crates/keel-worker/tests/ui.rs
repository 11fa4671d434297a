//! The web console in a real browser: Debian's chromium, headless, driven through
//! chromedriver (WebDriver), against a real worker holding the demo's runs and reaching moto.
//! Each step saves a screenshot under `target/ui-shots/`; the ones docs/ui.md shows are
//! copied from there.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use keel_testkit::demo::{self, DemoOptions, Worker};
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{FaultProxy, Rules};
use serde_json::{json, Value};

use common::{worker, KEEL};

/// Longest wait for the page to show what the API holds (it polls every second).
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// chromedriver on a free loopback port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chromedriver() -> Driver {
    let path = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)");
    let port = free_port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{url}/status")).call().is_err() {
        assert!(Instant::now() < deadline, "chromedriver never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver { child, url }
}

/// A headless chromium session that records every request the page makes.
async fn browser(driver: &Driver, profile: &Path, width: u32) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.display()),
                format!("--window-size={width},1000"),
            ],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({"performance": "ALL"}));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

/// Every request the browser made so far, as (URL, URL of the document that made it):
/// chromedriver's performance log, the DevTools protocol's `Network.requestWillBeSent`,
/// blocked requests included.
async fn requested(driver: &Driver, client: &Client) -> Vec<(String, String)> {
    let session = client.session_id().await.unwrap().expect("a session");
    let log: Value = ureq::post(&format!("{}/session/{session}/se/log", driver.url))
        .send_json(json!({"type": "performance"}))
        .expect("the performance log")
        .into_json()
        .unwrap();
    log["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| {
            let message: Value = serde_json::from_str(entry["message"].as_str()?).ok()?;
            let message = &message["message"];
            let params = &message["params"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (message["method"] == "Network.requestWillBeSent").then(|| {
                (
                    text(&params["request"]["url"]),
                    text(&params["documentURL"]),
                )
            })
        })
        .collect()
}

fn shots() -> PathBuf {
    // target/debug/keel -> target/ui-shots
    let dir = Path::new(KEEL)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("ui-shots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// Polls `check` (a script returning a value, `null` while not yet) until it is not null.
async fn until(client: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let value = client.execute(script, vec![]).await.expect(what);
        if !value.is_null() {
            return value;
        }
        if Instant::now() >= deadline {
            let said = client
                .execute("const e = document.getElementById('view-error'); return e ? e.textContent : '';", vec![])
                .await
                .unwrap_or_default();
            panic!("the page never showed {what} (its error line: {said})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rows of the runs table: `[[id, status], ...]`, once there are some.
const ROWS: &str = "const rows = [...document.querySelectorAll('#runs tr[data-run]')]
    .map(r => [r.dataset.run, r.querySelector('[data-status]').dataset.status]);
  return rows.length ? rows : null;";

fn api(w: &Worker, path: &str) -> Value {
    ureq::get(&format!("{}{path}", w.api))
        .set("Authorization", &format!("Bearer {}", w.token()))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .into_json()
        .unwrap()
}

fn post(w: &Worker, path: &str, body: Value) -> Value {
    ureq::post(&format!("{}{path}", w.api))
        .set("Authorization", &format!("Bearer {}", w.token()))
        .send_json(body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
        .into_json()
        .unwrap()
}

async fn sign_in(client: &Client, w: &Worker, token: &str) {
    client.goto(&format!("{}/ui/", w.api)).await.unwrap();
    let field = client
        .wait()
        .for_element(Locator::Id("token"))
        .await
        .unwrap();
    field.send_keys(token).await.unwrap();
    client
        .find(Locator::Css("#login-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The console against the demo's runs: a wrong token shows the login form again; the list
/// shows every run with its status; filters narrow it; a compensated run's timeline shows
/// its compensations; the latency page plots each operation; cancel from the page
/// compensates a running run; actions a state does not allow are disabled with the reason;
/// and the page requested nothing from anywhere but the worker.
#[test]
fn the_console_shows_the_demo_and_cancels_a_running_run() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut narration = Vec::new();
    let demo_run = demo::run(
        &DemoOptions {
            keel: KEEL.into(),
            dir: dir.path().to_path_buf(),
            clients: 2,
            fleet: 6,
            seed: 3,
        },
        &mut narration,
    );
    let narration = String::from_utf8_lossy(&narration);
    assert!(demo_run.is_ok(), "{demo_run:?}\n{narration}");
    assert!(
        narration.contains("/ui/"),
        "the demo names the console:\n{narration}"
    );

    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let data = dir.path().join("keel-data");
    // Through the fault proxy, with no faults: it plays Greengrass's deployment lifecycle,
    // which moto does not.
    let proxy = FaultProxy::start(&account.endpoint, Rules::seeded(5)).expect("the proxy");
    let w = worker(&data, &account, &proxy.endpoint(), &[]);
    let driver = chromedriver();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let profile = tempfile::tempdir().unwrap();
        let client = browser(&driver, profile.path(), 1280).await;

        // A wrong token: the login form again, with the reason, and no data.
        sign_in(&client, &w, "not-the-token").await;
        let error = until(&client, "the login error", "const e = document.getElementById('login-error').textContent; return e ? e : null;").await;
        assert!(error.as_str().unwrap().contains("Wrong token"), "{error}");
        let shown: bool = serde_json::from_value(
            client
                .execute("return !document.getElementById('login').hidden && document.getElementById('view').hidden;", vec![])
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(shown, "the login form, not the view");
        shot(&client, "login").await;

        // The list: every run with the status the API gives it.
        sign_in(&client, &w, &w.token()).await;
        let all = api(&w, "/v1/runs?limit=200");
        let expected: Vec<(String, String)> = all["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].as_str().unwrap().into(), r["status"].as_str().unwrap().into()))
            .collect();
        assert!(expected.len() >= 10, "the demo's runs: {expected:?}");
        let rows: Vec<(String, String)> =
            serde_json::from_value(until(&client, "the runs", ROWS).await).unwrap();
        assert_eq!(rows, expected[..rows.len().min(50)].to_vec());
        assert!(rows.iter().any(|(_, s)| s == "compensated"), "{rows:?}");
        until(&client, "the counts", "return document.querySelector('[data-count=completed]') ? true : null;").await;
        shot(&client, "list").await;

        // Filters narrow the list: by status, then by id prefix.
        client
            .goto(&format!("{}/ui/#/runs", w.api))
            .await
            .unwrap();
        client
            .execute("document.querySelector('#filters select[name=status]').value = 'compensated';", vec![])
            .await
            .unwrap();
        client.find(Locator::Id("apply")).await.unwrap().click().await.unwrap();
        let compensated: Vec<(String, String)> = serde_json::from_value(
            until(&client, "the compensated runs", &ROWS.replace("rows.length", "rows.length && rows.every(r => r[1] === 'compensated')")).await,
        )
        .unwrap();
        let want: Vec<_> = expected.iter().filter(|(_, s)| s == "compensated").cloned().collect();
        assert_eq!(compensated, want);
        let prefix = "fleet";
        client
            .goto(&format!("{}/ui/#/runs?prefix={prefix}", w.api))
            .await
            .unwrap();
        let fleet: Vec<(String, String)> = serde_json::from_value(
            until(&client, "the fleet's runs", &ROWS.replace("rows.length", "rows.length && rows.every(r => r[0].startsWith('fleet'))")).await,
        )
        .unwrap();
        let want: Vec<_> = expected.iter().filter(|(id, _)| id.starts_with(prefix)).cloned().collect();
        assert_eq!(fleet, want);
        assert!(fleet.len() < expected.len());

        // A compensated run's timeline shows each compensation, in its own colour.
        let (doomed, _) = want_compensated(&expected);
        let history = api(&w, &format!("/v1/runs/{doomed}/history"));
        let undone = history["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "step_compensation_started")
            .count();
        assert!(undone > 0, "{history}");
        client
            .goto(&format!("{}/ui/#/run/{doomed}", w.api))
            .await
            .unwrap();
        let bars = until(&client, "the compensations", "const n = document.querySelectorAll('#timeline .tl-bar.undo').length; return n ? n : null;").await;
        assert_eq!(bars.as_u64().unwrap() as usize, undone);
        let cancel_disabled = client
            .execute("const b = document.getElementById('action-cancel'); return [b.disabled, b.title];", vec![])
            .await
            .unwrap();
        assert_eq!(cancel_disabled[0], true);
        assert!(cancel_disabled[1].as_str().unwrap().contains("the run is compensated"), "{cancel_disabled}");
        shot(&client, "timeline").await;

        // Latency: one distribution per operation the API reports.
        let stats = api(&w, "/v1/stats");
        client.goto(&format!("{}/ui/#/latency", w.api)).await.unwrap();
        let plotted = until(&client, "the latency plots", "const n = document.querySelectorAll('#plots [data-operation] svg.distribution').length; return n ? n : null;").await;
        assert_eq!(plotted.as_u64().unwrap() as usize, stats.as_array().unwrap().len());
        // Each plot's bars add up to its operation's count.
        for op in stats.as_array().unwrap() {
            let name = op["operation"].as_str().unwrap();
            let bars = client
                .execute(
                    "const card = [...document.querySelectorAll('#plots [data-operation]')].find(c => c.dataset.operation === arguments[0]);
                     return [...card.querySelectorAll('rect.bar title')].map(t => Number(t.textContent.split(': ').pop())).reduce((a, b) => a + b, 0);",
                    vec![json!(name)],
                )
                .await
                .unwrap();
            assert_eq!(bars, op["count"], "{name}");
        }
        let limiters = until(&client, "the limiters", "const n = document.querySelectorAll('#limiters svg').length; return n ? n : null;").await;
        assert_eq!(limiters, 4, "one plot per service");
        // The screenshot shows the operation with the most executions.
        let busiest = stats
            .as_array()
            .unwrap()
            .iter()
            .max_by_key(|op| op["count"].as_u64())
            .unwrap()["operation"]
            .clone();
        client
            .execute(
                "[...document.querySelectorAll('#plots [data-operation]')].find(c => c.dataset.operation === arguments[0]).scrollIntoView();",
                vec![busiest],
            )
            .await
            .unwrap();
        shot(&client, "latency").await;

        // Cancel from the page: a core waiting for its check-in is compensated. A second
        // core is cancelled by someone else while the page asks for confirmation: the
        // page's cancel is then refused, and the page says why.
        let (core, raced) = ("ui-cancel-core", "ui-refused-core");
        for id in [core, raced] {
            post(
                &w,
                "/v1/runs",
                json!({"workflow": "greengrass.provision-core", "id": id,
                       "input": demo::core_input(id, 1, Some(3_600))}),
            );
        }
        for id in [core, raced] {
            waits_for_check_in(&w, id);
        }
        client.goto(&format!("{}/ui/#/run/{core}", w.api)).await.unwrap();
        until(&client, "an enabled cancel", "const b = document.getElementById('action-cancel'); return b && !b.disabled ? true : null;").await;
        client.find(Locator::Id("action-cancel")).await.unwrap().click().await.unwrap();
        client.wait().for_element(Locator::Id("confirm-yes")).await.unwrap().click().await.unwrap();
        wait_for_status(&w, core, "compensated");
        until(&client, "the compensated status", "const b = document.querySelector('#run [data-status]'); return b && b.dataset.status === 'compensated' ? true : null;").await;
        shot(&client, "cancelled").await;

        client.goto(&format!("{}/ui/#/run/{raced}", w.api)).await.unwrap();
        until(&client, "an enabled cancel", "const b = document.getElementById('action-cancel'); return b && !b.disabled ? true : null;").await;
        client.find(Locator::Id("action-cancel")).await.unwrap().click().await.unwrap();
        client.wait().for_element(Locator::Id("confirm-yes")).await.unwrap();
        // While the confirmation is open, another operator cancels the run and it ends.
        post(&w, &format!("/v1/runs/{raced}/cancel"), json!({}));
        wait_for_status(&w, raced, "compensated");
        client.find(Locator::Id("confirm-yes")).await.unwrap().click().await.unwrap();
        let refused = until(&client, "the refusal's line", "const p = document.getElementById('action-error'); return p && p.textContent ? p.textContent : null;").await;
        let refused = refused.as_str().unwrap();
        assert!(
            refused.starts_with("Cancel refused: ") && refused.contains("compensated"),
            "the page's line: {refused:?}"
        );
        // The page shows the run as it is now, beside the refusal.
        until(&client, "the compensated status", "const b = document.querySelector('#run [data-status]'); return b && b.dataset.status === 'compensated' ? true : null;").await;
        shot(&client, "refused").await;
        // The account is the worker's own: the cores were all it made.
        let truth = keel_testkit::inventory::Inventory::read(&account.sdk_config().await)
            .await
            .unwrap();
        assert!(
            truth.is_empty(),
            "the cancelled cores left this in moto: {}",
            truth.summary()
        );

        // A narrow screen still shows the list.
        let narrow_profile = tempfile::tempdir().unwrap();
        let narrow = browser(&driver, narrow_profile.path(), 390).await;
        sign_in(&narrow, &w, &w.token()).await;
        until(&narrow, "the runs on a narrow screen", ROWS).await;
        shot(&narrow, "list-narrow").await;

        // Nothing was requested from anywhere but the worker: not by the console, and not
        // over the network at all (the browser's own new-tab page loads `chrome://` files
        // from inside the browser).
        let ours = format!("{}/", w.api);
        for c in [&client, &narrow] {
            let requests = requested(&driver, c).await;
            let by_console = requests
                .iter()
                .filter(|(_, doc)| doc.starts_with(&ours))
                .count();
            assert!(by_console > 5, "{requests:?}");
            let foreign: Vec<_> = requests
                .iter()
                .filter(|(url, doc)| {
                    let network = ["http:", "https:", "ws:", "wss:"]
                        .iter()
                        .any(|scheme| url.starts_with(scheme));
                    // `data:` is inline (the date field's own calendar icon, say).
                    let inline = url.starts_with("data:");
                    !url.starts_with(&ours) && !inline && (doc.starts_with(&ours) || network)
                })
                .collect();
            assert!(foreign.is_empty(), "requests elsewhere: {foreign:?}");
        }
        narrow.close().await.unwrap();
        client.close().await.unwrap();
    });
}

/// Waits until the core run `id` waits for its device's check-in.
fn waits_for_check_in(w: &Worker, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let history = api(w, &format!("/v1/runs/{id}/history"));
        let entries = history["entries"].as_array().unwrap();
        if entries.iter().any(|e| e["type"] == "receive_started") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the core {id} never waited for its check-in: {} after {:?}",
            history["run"]["status"],
            entries.iter().rev().take(3).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the run `id` is in `status`.
fn wait_for_status(w: &Worker, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = api(w, &format!("/v1/runs/{id}"))["status"].clone();
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the run {id} is {now}, not {status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The demo's compensated core (its doomed deployment).
fn want_compensated(runs: &[(String, String)]) -> (String, String) {
    runs.iter()
        .find(|(_, s)| s == "compensated")
        .cloned()
        .expect("a compensated run")
}
