//! The CLI verbs: each is one or a few requests to a running worker's API, printed as a table
//! (or JSON with `--json`). Errors are one line with an exit code: 2 when the worker refused
//! the request (4xx) or the command line is wrong, 4 when `keel get` found nothing (newer)
//! published, 1 otherwise.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use keel_engine::{Delivered, Event, OperationStats, Published, RunHistory, RunRecord};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde_json::Value;

use keel_engine::limits::{EVENT_PAYLOAD_BYTES_MAX, INPUT_BYTES_MAX};
use keel_engine::RunsPage;

use crate::api::{
    uuid_v4, ApiError, EmptyRequest, ResolveRequest, StartRequest, EVENT_ID_HEADER,
    PUBLISHED_WAIT_MAX,
};
use crate::worker::{check_token, read_token_file, TOKEN_FILE};

mod batch;
pub(crate) mod schedules;

pub(crate) use batch::BatchOptions;

/// A failed verb.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The worker answered with an error.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error's machine word (`not_found`, ...), empty if the answer had none.
        kind: String,
        /// The worker's one line.
        message: String,
    },
    /// No answer.
    #[error("cannot reach the worker at {api}: {detail} (is `keel worker` running? see --api)")]
    Unreachable {
        /// The API address.
        api: String,
        /// Why.
        detail: String,
    },
    /// Anything on this side: an unreadable input file, a waited-for run that failed.
    #[error("{0}")]
    Local(String),
    /// The command line asked for something impossible.
    #[error("{0}")]
    Usage(String),
    /// `keel get`: the run has published no value of the name (newer than `--after`).
    #[error("{0}")]
    NothingPublished(String),
}

/// Exit code of `keel get` when nothing (newer than `--after`) was published.
pub(crate) const EXIT_NOTHING_PUBLISHED: u8 = 4;

impl ClientError {
    /// The process exit code.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused { status, .. } if (400..500).contains(status) => 2,
            ClientError::Usage(_) => 2,
            ClientError::NothingPublished(_) => EXIT_NOTHING_PUBLISHED,
            _ => 1,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// The token from `file` (trimmed; the file must be owner-only), else from `KEEL_API_TOKEN`,
/// else none.
pub(crate) fn token(file: Option<&Path>) -> std::result::Result<Option<String>, String> {
    if let Some(path) = file {
        return read_token_file(path, true)
            .map(Some)
            .map_err(|e| format!("API token file {}: {e}", path.display()));
    }
    match std::env::var("KEEL_API_TOKEN") {
        Ok(token) => {
            check_token(token.trim()).map_err(|e| format!("KEEL_API_TOKEN: {e}"))?;
            Ok(Some(token.trim().to_string()))
        }
        Err(_) => Ok(None),
    }
}

/// The token the worker keeps in `data_dir`, if the file exists.
pub(crate) fn data_dir_token(data_dir: &Path) -> std::result::Result<Option<String>, String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("API token file {}: {e}", path.display())),
    }
    read_token_file(&path, false)
        .map(Some)
        .map_err(|e| format!("API token file {}: {e}", path.display()))
}

/// Refuses to send the token to a loopback port another user listens on: when the worker is
/// down, any local user can take its port and wait for a CLI to send its token there. The
/// owners of listening sockets come from `/proc/net/tcp` and `/proc/net/tcp6`; an API that is
/// not on loopback, or a port nobody listens on, passes (the request then fails to connect).
pub(crate) fn check_listener(api: &str) -> std::result::Result<(), String> {
    let Ok(uri) = api.parse::<axum::http::Uri>() else {
        return Ok(());
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    if !loopback {
        return Ok(());
    }
    let me = rustix::process::geteuid().as_raw();
    let port_hex = format!(":{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
            let (Some(local), Some(state), Some(uid)) =
                (fields.get(1), fields.get(3), fields.get(7))
            else {
                continue;
            };
            if *state != "0A" || !local.ends_with(&port_hex) {
                continue;
            }
            match uid.parse::<u32>() {
                Ok(uid) if uid != me => {
                    return Err(format!(
                        "the API's port {port} is held by another user (uid {uid}, you are uid \
                         {me}): not sending the API token there (is the worker running, as \
                         you?)"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A connection to one worker's API.
pub(crate) struct Client {
    api: String,
    token: Option<String>,
    json: bool,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the API at `api`.
    pub(crate) fn new(api: &str, token: Option<String>, json: bool) -> Client {
        Client {
            api: api.trim_end_matches('/').to_string(),
            token,
            json,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.api));
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    fn answer<T: DeserializeOwned>(
        &self,
        result: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        match result {
            Ok(response) => response
                .into_json()
                .map_err(|e| ClientError::Local(format!("unreadable answer from the worker: {e}"))),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let (kind, message) = serde_json::from_str::<ApiError>(&text)
                    .map(|e| (e.kind, e.error))
                    .unwrap_or_else(|_| (String::new(), format!("HTTP {status}: {}", text.trim())));
                Err(ClientError::Refused {
                    status,
                    kind,
                    message,
                })
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Unreachable {
                api: self.api.clone(),
                detail: t.to_string(),
            }),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("GET", path).call())
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> Result<T> {
        self.answer(self.request("POST", path).send_json(body))
    }

    fn print<T: serde::Serialize>(&self, value: &T, table: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON of a value read as JSON")
            );
        } else {
            print!("{}", table());
        }
    }

    /// `keel start`.
    pub(crate) fn start(&self, workflow: &str, id: &str, input: &str, wait: bool) -> Result<()> {
        let input = read_json(input, "input", INPUT_BYTES_MAX)?;
        let request = StartRequest {
            workflow: workflow.into(),
            id: id.into(),
            input,
            event: None,
        };
        let record: RunRecord = self.post("/v1/runs", &request)?;
        if !wait {
            self.print(&record, || record_table(std::slice::from_ref(&record)));
            return Ok(());
        }
        let record = self.wait(&record.id.to_string())?;
        self.print(&record, || record_table(std::slice::from_ref(&record)));
        if record.status == keel_engine::RunStatus::Completed {
            Ok(())
        } else {
            Err(ClientError::Local(format!(
                "run {} ended {}: {}",
                record.id,
                record.status,
                record.error.as_deref().unwrap_or("no error recorded")
            )))
        }
    }

    /// Polls until the run ends, with a progress line on stderr (rewritten in place on a
    /// terminal, one line every 5 s otherwise).
    fn wait(&self, id: &str) -> Result<RunRecord> {
        let started = Instant::now();
        let terminal = std::io::stderr().is_terminal();
        let mut last_line = Instant::now() - Duration::from_secs(60);
        loop {
            let history: RunHistory = self.get(&format!("/v1/runs/{}/history", encode(id)))?;
            let line = progress(&history, started.elapsed());
            if terminal {
                eprint!("\r\x1b[2K{line}");
            } else if last_line.elapsed() >= Duration::from_secs(5)
                || history.run.status.is_terminal()
            {
                eprintln!("{line}");
                last_line = Instant::now();
            }
            let _ = std::io::stderr().flush();
            if history.run.status.is_terminal() {
                if terminal {
                    eprintln!();
                }
                return Ok(history.run);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `keel status`.
    pub(crate) fn status(&self, id: &str) -> Result<()> {
        let record: RunRecord = self.get(&format!("/v1/runs/{}", encode(id)))?;
        self.print(&record, || record_details(&record));
        Ok(())
    }

    /// `keel list`: one page; where more follow, stderr says how to get the next.
    pub(crate) fn list(
        &self,
        status: Option<&str>,
        after: Option<&str>,
        prefix: Option<&str>,
        limit: usize,
    ) -> Result<()> {
        let mut path = format!("/v1/runs?limit={limit}");
        if let Some(status) = status {
            path += &format!("&status={}", encode(status));
        }
        if let Some(after) = after {
            path += &format!("&after={}", encode(after));
        }
        if let Some(prefix) = prefix {
            path += &format!("&prefix={}", encode(prefix));
        }
        let page: RunsPage = self.get(&path)?;
        self.print(&page, || record_table(&page.runs));
        if let Some(next) = &page.next {
            let prefix = prefix.map(|p| format!(" --prefix {p}")).unwrap_or_default();
            eprintln!("more runs follow: keel list{prefix} --after {next}");
        }
        Ok(())
    }

    /// `keel history`.
    pub(crate) fn history(&self, id: &str) -> Result<()> {
        let history: RunHistory = self.get(&format!("/v1/runs/{}/history", encode(id)))?;
        if self.json {
            let rows = crate::history::rows(&history);
            let events = crate::history::deliveries(&history);
            let reruns = crate::history::reruns(&history);
            self.print(
                &serde_json::json!({
                    "run": history.run, "operations": rows, "events": events, "reruns": reruns
                }),
                String::new,
            );
        } else {
            print!("{}", crate::history::table(&history));
        }
        Ok(())
    }

    /// `keel cancel|pause|resume|retry-compensation|resolve`.
    pub(crate) fn operate(&self, id: &str, operation: &str, note: Option<String>) -> Result<()> {
        let path = format!("/v1/runs/{}/{operation}", encode(id));
        let record: RunRecord = match note {
            Some(note) => self.post(&path, &ResolveRequest { note })?,
            None => self.post(&path, &EmptyRequest {})?,
        };
        self.print(&record, || record_table(std::slice::from_ref(&record)));
        Ok(())
    }

    /// `keel stats`.
    pub(crate) fn stats(&self) -> Result<()> {
        let stats: Vec<OperationStats> = self.get("/v1/stats")?;
        self.print(&stats, || stats_table(&stats));
        Ok(())
    }

    /// `keel send`: the payload from `data` (a file, or `-` for stdin) as event `name` to run
    /// `id`, with `event_id` or a new one, which stderr names first so that a send whose
    /// answer got lost can be retried as the same event.
    pub(crate) fn send(
        &self,
        id: &str,
        name: &str,
        data: &str,
        event_id: Option<String>,
    ) -> Result<()> {
        let payload = read_json(data, "event payload", EVENT_PAYLOAD_BYTES_MAX)?;
        let event_id = match event_id {
            Some(event_id) => event_id,
            None => {
                let made = uuid_v4();
                eprintln!(
                    "event id {made} (to retry this send as the same event: --event-id {made})"
                );
                made
            }
        };
        let path = format!("/v1/runs/{}/events/{}", encode(id), encode(name));
        let request = self.request("POST", &path).set(EVENT_ID_HEADER, &event_id);
        let delivered: Delivered = self.answer(request.send_json(&payload))?;
        self.print(&delivered, || {
            let Delivered {
                run_id,
                name,
                event_id,
                duplicate,
            } = &delivered;
            if *duplicate {
                format!(
                    "event {event_id} ({name}) was delivered to run {run_id} before: nothing \
                     changed\n"
                )
            } else {
                format!("delivered event {event_id} ({name}) to run {run_id}\n")
            }
        });
        Ok(())
    }

    /// `keel get`: the latest value run `id` published under `name`, waiting up to `wait`
    /// for one (newer than version `after`, if given).
    pub(crate) fn get_published(
        &self,
        id: &str,
        name: &str,
        wait: Option<Duration>,
        after: Option<u64>,
    ) -> Result<()> {
        let mut path = format!("/v1/runs/{}/published/{}", encode(id), encode(name));
        let mut query = Vec::new();
        if let Some(wait) = wait {
            query.push(format!("wait={}ms", wait.as_millis()));
        }
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        if !query.is_empty() {
            path += &format!("?{}", query.join("&"));
        }
        // The answer may take the whole wait: the agent's own timeout would cut it short.
        let timeout = wait.unwrap_or_default().min(PUBLISHED_WAIT_MAX) + Duration::from_secs(30);
        let answer = self.answer(self.request("GET", &path).timeout(timeout).call());
        let published: Published = match answer {
            Err(ClientError::Refused { kind, message, .. }) if kind == "not_published" => {
                return Err(ClientError::NothingPublished(message))
            }
            other => other?,
        };
        if let Some(after) = after.filter(|after| published.version <= *after) {
            return Err(ClientError::NothingPublished(format!(
                "run {id} has published no value named {name:?} newer than version {after} \
                 (the latest is version {})",
                published.version
            )));
        }
        self.print(&published, || {
            let value = serde_json::to_string_pretty(&published.value)
                .expect("JSON of a value read as JSON");
            format!(
                "{name} of run {id}: version {}, published {} UTC\n{value}\n",
                published.version,
                utc_time(published.at_ms)
            )
        });
        Ok(())
    }
}

/// The JSON in `source` (a file, or `-` for stdin), at most `bytes_max` bytes; `what` names
/// it in errors (`input`, `event payload`).
fn read_json(source: &str, what: &str, bytes_max: usize) -> Result<Value> {
    let from = if source == "-" { "stdin" } else { source };
    let text = if source == "-" {
        read_bounded(std::io::stdin().lock(), from, what, bytes_max)
            .map_err(|e| ClientError::Local(format!("cannot read the {what} from stdin: {e}")))?
    } else {
        std::fs::File::open(source)
            .and_then(|file| read_bounded(file, from, what, bytes_max))
            .map_err(|e| ClientError::Usage(format!("cannot read the {what} file {source}: {e}")))?
    };
    serde_json::from_str(&text)
        .map_err(|e| ClientError::Usage(format!("the {what} in {from} is not JSON: {e}")))
}

/// All of `source` as text, refused once it is over `bytes_max` (the limit of the `what` it
/// holds: a run's input, an event's payload), without reading further.
fn read_bounded(
    source: impl Read,
    from: &str,
    what: &str,
    bytes_max: usize,
) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    source.take(bytes_max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > bytes_max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{from} holds more than the {bytes_max}-byte limit of the {what}"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// A path segment with everything but letters and digits percent-encoded (run ids of child
/// runs hold `/`).
fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

/// `id: status, N operations done, now: kind, elapsed`.
fn progress(history: &RunHistory, elapsed: Duration) -> String {
    let mut done = 0;
    let mut current = String::new();
    for entry in &history.entries {
        match &entry.event {
            Event::StepCompleted { .. }
            | Event::WaitEnded { .. }
            | Event::TimerFired { .. }
            | Event::ChildEnded { .. }
            | Event::EventReceived { .. }
            | Event::ReceiveTimedOut { .. }
            | Event::ValuePublished { .. } => done += 1,
            Event::StepStarted { kind, .. } | Event::WaitStarted { kind, .. } => {
                current = kind.clone()
            }
            Event::ReceiveStarted { names, .. } => current = format!("receive {}", names.join("|")),
            Event::ChildStarted { workflow, .. } => current = format!("child {workflow}"),
            Event::StepCompensationStarted { step, .. } => current = format!("undoing #{}", step.0),
            _ => {}
        }
    }
    format!(
        "{}: {}, {done} operations done, last: {}, {:.1} s",
        history.run.id,
        history.run.status,
        if current.is_empty() { "-" } else { &current },
        elapsed.as_secs_f64()
    )
}

/// One run's table, and under it the run it reruns, if it is a rerun.
fn record_details(record: &RunRecord) -> String {
    let mut out = record_table(std::slice::from_ref(record));
    if let Some(of) = &record.rerun_of {
        out += &format!("rerun of {of}\n");
    }
    out
}

fn record_table(runs: &[RunRecord]) -> String {
    let header = ["id", "workflow", "status", "updated (UTC)", "error"];
    let rows: Vec<[String; 5]> = runs
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.workflow.clone(),
                r.status.to_string(),
                utc_time(r.updated_at_ms),
                r.error
                    .as_deref()
                    .map(|e| {
                        e.lines()
                            .next()
                            .unwrap_or_default()
                            .chars()
                            .take(80)
                            .collect()
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    align(&header, &rows)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a time in ms since the Unix epoch.
pub(crate) fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn stats_table(stats: &[OperationStats]) -> String {
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let header = [
        "operation",
        "count",
        "min ms",
        "mean ms",
        "max ms",
        "sigma ms",
        "p50 ms",
        "p99 ms",
        "worst (run)",
    ];
    let rows: Vec<[String; 9]> = stats
        .iter()
        .map(|s| {
            let worst = s
                .outliers
                .iter()
                .take(3)
                .map(|o| format!("{} ({})", ms(o.duration), o.run_id))
                .collect::<Vec<_>>()
                .join(", ");
            [
                s.operation.clone(),
                s.count.to_string(),
                ms(s.min),
                ms(s.mean),
                ms(s.max),
                ms(s.std_dev),
                ms(s.p50),
                ms(s.p99),
                worst,
            ]
        })
        .collect();
    align(&header, &rows)
}

/// A table as the CLI prints its data: the header, then a line per row, columns padded to
/// their widest cell and two spaces apart, no borders or rules (so a line greps as a row),
/// and no trailing spaces. Laid out by `comfy-table` (its `NOTHING` preset: no box drawing).
pub(crate) fn align<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row.to_vec());
    }
    for (i, column) in table.column_iter_mut().enumerate() {
        let gap = if i + 1 < N { 2 } else { 0 };
        column.set_padding((0, gap));
    }
    table
        .lines()
        .map(|line| line.trim_end().to_string() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    /// A table is its header and rows, columns two spaces apart at their widest cell, with
    /// no borders and no trailing spaces.
    #[test]
    fn tables_are_plain_aligned_columns() {
        let rows = [
            ["run-1".to_string(), "completed".into(), String::new()],
            [
                "a-longer-id".to_string(),
                "failed".into(),
                "no such role".into(),
            ],
        ];
        assert_eq!(
            super::align(&["id", "status", "error"], &rows),
            "id           status     error\n\
             run-1        completed\n\
             a-longer-id  failed     no such role\n"
        );
        assert_eq!(super::align(&["id", "status"], &[]), "id  status\n");
    }

    #[test]
    fn times_are_shown_as_utc_dates() {
        assert_eq!(super::utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc_time(1_795_467_028_707), "2026-11-23 20:50:28");
    }
}
