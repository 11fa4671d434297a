//! What the fault proxy knows and decides, apart from any I/O: rule counters, the request
//! log, resources in their lag windows, roles and their propagation, deployments and their
//! lifecycle, and cached read answers. Every method runs under the proxy's one lock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{http, Response};

use super::classify::{identifiers_in_answer, Call, Protocol};
use super::rules::{draw, stream_of};
use super::shapes::{self, ErrorKind};
use super::{Applied, Dist, Fault, LagRule, RequestRecord, Rules, CACHE_MAX};

/// moto's answer, kept whole so it can be inspected, cached and replayed.
#[derive(Debug, Clone)]
pub(super) struct Upstream {
    pub(super) status: http::StatusCode,
    pub(super) headers: http::HeaderMap,
    pub(super) body: Bytes,
}

impl Upstream {
    pub(super) fn to_response(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body.clone()));
        *response.status_mut() = self.status;
        for (name, value) in &self.headers {
            if !matches!(
                name.as_str(),
                "transfer-encoding" | "connection" | "keep-alive"
            ) {
                response.headers_mut().append(name, value.clone());
            }
        }
        response
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RuleCount {
    matched: u64,
    fired: u32,
}

/// A resource in its create-lag window.
#[derive(Debug, Clone, Copy)]
struct Lagging {
    until: Instant,
    reads: u64,
    /// Whether the caller has had a create's answer naming it. A create whose answer was
    /// lost starts its lag again when a replay of its client token is answered, so that the
    /// window is seen from the caller's side however long its retries took.
    answered: bool,
}

#[derive(Debug, Clone, Copy)]
struct Deployment {
    created: Instant,
    building: Duration,
    in_progress: Duration,
    fails: bool,
}

pub(super) struct State {
    pub(super) rules: Rules,
    pub(super) fired: Vec<RuleCount>,
    next_seq: u64,
    pub(super) log: Vec<RequestRecord>,
    /// (service, name/id/ARN) of resources in their create-lag window.
    created: HashMap<(String, String), Lagging>,
    /// (service, name/id/ARN) of resources in their delete-lag window, until when.
    deleted: HashMap<(String, String), Instant>,
    /// (service, operation, ref) -> the last successful read answer naming `ref`.
    cache: HashMap<(String, String, String), Upstream>,
    /// Role ARN -> when AssumeRole starts to succeed.
    roles: HashMap<String, Instant>,
    /// Greengrass deployment id -> its lifecycle.
    deployments: HashMap<String, Deployment>,
    /// Greengrass group id -> its name, learnt from CreateGroup answers.
    group_names: HashMap<String, String>,
    /// Ordinals for seeded draws: creates per service, deployments, roles.
    ordinals: HashMap<String, u64>,
    /// EC2 client tokens: (access key id, token) -> the create that first used it.
    client_tokens: HashMap<(String, String), TokenUse>,
    /// EC2 instance id -> how it reads, for instances launched through the proxy.
    instances: HashMap<String, Ec2Instance>,
}

/// How an EC2 instance launched through the proxy reads ([`crate::proxy::Ec2Rule`]).
#[derive(Debug, Clone, Copy)]
struct Ec2Instance {
    /// It reads `pending` until then.
    pending_until: Instant,
    /// It reads `pending` for ever.
    stuck: bool,
    /// Set at its first `running` read: it may flap until then.
    flaps_until: Option<Instant>,
    /// Reads by id so far (the flapping draws' ordinal).
    reads: u64,
    /// Its launch's ordinal through the proxy: the flapping draws' stream. Not its id, which
    /// moto draws at random, so a seed plays the same flaps in every run.
    launch: u64,
}

/// The EC2 create that first used a client token: its parameters, and moto's answer.
#[derive(Debug)]
struct TokenUse {
    params: Vec<(String, String)>,
    answer: Upstream,
}

/// What EC2 does with a create that carries a client token used before.
pub(super) enum ClientToken {
    /// The same parameters: the first create's answer, and nothing created.
    Replay(Upstream),
    /// Other parameters: `IdempotentParameterMismatch`.
    Mismatch,
}

/// The EC2 operations whose `ClientToken` makes a repeated call return the first one's result.
const CLIENT_TOKEN_OPERATIONS: [&str; 2] = ["RunInstances", "CreateVolume"];

/// The parameters of an EC2 create that its client token vouches for: all but the action,
/// the API version and the token itself, in order.
fn token_parameters(call: &Call) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = call
        .params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "Action" | "Version" | "ClientToken"))
        .cloned()
        .collect();
    params.sort();
    params
}

/// The key of an EC2 create's client token, when it is one EC2 honours.
fn client_token_key(call: &Call) -> Option<(String, String)> {
    if call.service != "ec2" || !CLIENT_TOKEN_OPERATIONS.contains(&call.operation.as_str()) {
        return None;
    }
    let token = call.param("ClientToken")?;
    Some((call.access_key.clone(), token.to_string()))
}

impl State {
    pub(super) fn new(rules: Rules) -> Self {
        Self {
            fired: vec![RuleCount::default(); rules.faults.len()],
            rules,
            next_seq: 0,
            log: Vec::new(),
            created: HashMap::new(),
            deleted: HashMap::new(),
            cache: HashMap::new(),
            roles: HashMap::new(),
            deployments: HashMap::new(),
            group_names: HashMap::new(),
            client_tokens: HashMap::new(),
            instances: HashMap::new(),
            ordinals: HashMap::new(),
        }
    }

    /// The next ordinal of `stream`, for a seeded draw.
    fn ordinal(&mut self, stream: &str) -> u64 {
        let n = self.ordinals.entry(stream.to_string()).or_insert(0);
        *n += 1;
        *n - 1
    }

    /// A seeded duration from `dist` for the next event of `stream`.
    fn sample(&mut self, stream: &str, dist: &Dist) -> Duration {
        let n = self.ordinal(stream);
        let s = stream_of(stream);
        Duration::from_millis(dist.sample(
            draw(self.rules.seed, s, 2 * n),
            draw(self.rules.seed, s, 2 * n + 1),
        ))
    }

    fn lag_rule(&self, service: &str) -> Option<&LagRule> {
        self.rules.lag.iter().find(|r| r.service == service)
    }
    /// When AssumeRole of `arn` starts to succeed, for a role created through the proxy.
    pub(super) fn assumable_at(&self, arn: &str) -> Option<Instant> {
        self.roles.get(arn).copied()
    }

    /// Numbers the request and runs the fault rules: the latency to add, and the fault (if any).
    pub(super) fn decide(&mut self, call: &Call) -> (u64, u64, Option<Fault>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let seed = self.rules.seed;
        let mut latency_ms = 0;
        let mut chosen = None;
        for i in 0..self.rules.faults.len() {
            let rule = &self.rules.faults[i];
            let matches = rule.service.as_ref().is_none_or(|s| *s == call.service)
                && rule.operation.as_ref().is_none_or(|o| *o == call.operation);
            if !matches || (chosen.is_some() && !matches!(rule.fault, Fault::Latency { .. })) {
                continue;
            }
            let (fault, probability, skip, limit) =
                (rule.fault.clone(), rule.probability, rule.skip, rule.limit);
            let count = &mut self.fired[i];
            let n = count.matched;
            count.matched += 1;
            let fires = n >= u64::from(skip)
                && limit.is_none_or(|l| count.fired < l)
                && draw(seed, i as u64, 2 * n) < probability;
            if !fires {
                continue;
            }
            count.fired += 1;
            match fault {
                Fault::Latency { delay } => {
                    latency_ms +=
                        delay.sample(draw(seed, i as u64, 2 * n + 1), draw(seed, !(i as u64), n))
                }
                other => chosen = Some(other),
            }
        }
        (seq, latency_ms, chosen)
    }

    /// GetDeploymentStatus of a deployment created through the proxy: its lifecycle.
    pub(super) fn deployment_answer(
        &self,
        call: &Call,
        record: &mut RequestRecord,
    ) -> Option<Response<Full<Bytes>>> {
        if call.service == "greengrass" && call.operation == "GetDeploymentStatus" {
            let id = call.label("DeploymentId").unwrap_or_default();
            let deployment = self.deployments.get(id).copied();
            if let Some(d) = deployment {
                let age = d.created.elapsed();
                let status = if age < d.building {
                    "Building"
                } else if age < d.building + d.in_progress {
                    "InProgress"
                } else if d.fails {
                    "Failure"
                } else {
                    "Success"
                };
                record.fault = Some(Applied::Deployment {
                    status: status.into(),
                });
                let mut answer = serde_json::json!({
                    "DeploymentStatus": status,
                    "DeploymentType": "NewDeployment",
                    "UpdatedAt": "2026-01-01T00:00:00.000Z",
                });
                if status == "Failure" {
                    answer["ErrorMessage"] =
                        "deployment failed (keel-fault-proxy deployment rule)".into();
                }
                return Some(shapes::json(answer));
            }
        }
        None
    }

    /// Create lag (not found, or found when flapping) and delete lag (an earlier answer).
    pub(super) fn lag_answer(
        &mut self,
        call: &Call,
        record: &mut RequestRecord,
    ) -> Option<Response<Full<Bytes>>> {
        let now = Instant::now();
        let rule = self.lag_rule(&call.service).cloned()?;
        if !call.is_create() && (!call.is_delete() || rule.include_deletes) {
            let lagging = call
                .refs
                .iter()
                .find(|r| {
                    self.created
                        .get(&(call.service.clone(), (*r).clone()))
                        .is_some_and(|l| l.until > now)
                })
                .cloned();
            if let Some(name) = lagging {
                let seed = self.rules.seed;
                let entry = self
                    .created
                    .get_mut(&(call.service.clone(), name.clone()))
                    .expect("found above");
                let n = entry.reads;
                entry.reads += 1;
                if rule.flap_found_probability > 0.0
                    && draw(seed, stream_of(&name), n) < rule.flap_found_probability
                {
                    record.fault = Some(Applied::LagFound);
                    return None;
                }
                record.fault = Some(Applied::LagNotFound);
                return Some(shapes::error(
                    call,
                    ErrorKind::NotFound,
                    &format!(
                        "{name} does not exist (not yet visible: keel-fault-proxy create lag)"
                    ),
                ));
            }
        }
        if call.is_read() {
            for r in &call.refs {
                let key = (call.service.clone(), r.clone());
                if self.deleted.get(&key).is_some_and(|until| *until > now) {
                    if let Some(cached) =
                        self.cache
                            .get(&(call.service.clone(), call.operation.clone(), r.clone()))
                    {
                        record.fault = Some(Applied::DeletedStillPresent);
                        return Some(cached.to_response());
                    }
                }
            }
        }
        None
    }

    /// Learns from moto's successful answers: new resources (lag, roles, deployments), deleted
    /// ones (delete lag), and read answers to replay during delete lag.
    /// What EC2 would answer to `call` for its client token, when it used one before (moto
    /// ignores client tokens and would create again); `None` to go on.
    pub(super) fn client_token(&self, call: &Call) -> Option<ClientToken> {
        let first = self.client_tokens.get(&client_token_key(call)?)?;
        Some(if first.params == token_parameters(call) {
            ClientToken::Replay(first.answer.clone())
        } else {
            ClientToken::Mismatch
        })
    }

    /// A client token's replay answered with the first create's answer, `first`: resources
    /// whose create's answer was lost start their create lag now.
    pub(super) fn replay_answered(&mut self, call: &Call, first: &Upstream) {
        let service = call.service.clone();
        let Some(lag) = self.lag_rule(&service).and_then(|r| r.after_create.clone()) else {
            return;
        };
        let unanswered: Vec<(String, String)> = created_keys(call, first)
            .into_iter()
            .map(|key| (service.clone(), key))
            .filter(|key| self.created.get(key).is_some_and(|l| !l.answered))
            .collect();
        if unanswered.is_empty() {
            // No draw: the stream's ordinals stay those of the service's creates.
            return;
        }
        let until = Instant::now() + self.sample(&format!("create-lag/{service}"), &lag);
        for key in unanswered {
            if let Some(lagging) = self.created.get_mut(&key) {
                lagging.answered = true;
                lagging.until = until;
            }
        }
    }

    /// Instances launched: each reads `pending` for a drawn time, or for ever when a tag
    /// value of the launch marks it stuck.
    fn observe_launch(&mut self, call: &Call, upstream: &Upstream, now: Instant) {
        let rule = self.rules.ec2.clone();
        let stuck = call.params.iter().any(|(k, v)| {
            k.starts_with("TagSpecification.")
                && k.ends_with(".Value")
                && rule.stuck_tagged.iter().any(|prefix| v.starts_with(prefix))
        });
        for id in xml_values(&upstream.body, "instanceId") {
            let pending_until = now + self.sample("ec2-pending", &rule.pending);
            let launch = self.ordinal("ec2-launch");
            let instance = Ec2Instance {
                pending_until,
                stuck,
                flaps_until: None,
                reads: 0,
                launch,
            };
            self.instances.entry(id).or_insert(instance);
        }
    }

    /// Makes a `DescribeInstances` answer what EC2 would give: instances launched through the
    /// proxy that have not started (or never will) read `pending`; one named by id that flaps
    /// reads as missing (the error answer to send instead, returned).
    pub(super) fn ec2_instances_read(
        &mut self,
        call: &Call,
        upstream: &mut Upstream,
        record: &mut RequestRecord,
    ) -> Option<Response<Full<Bytes>>> {
        if call.service != "ec2"
            || call.operation != "DescribeInstances"
            || !upstream.status.is_success()
        {
            return None;
        }
        let now = Instant::now();
        let rule = self.rules.ec2.clone();
        let seed = self.rules.seed;
        let named: Vec<String> = call
            .params
            .iter()
            .filter(|(k, _)| k.starts_with("InstanceId."))
            .map(|(_, v)| v.clone())
            .collect();
        let mut text = String::from_utf8_lossy(&upstream.body).into_owned();
        let mut pending = false;
        for id in xml_values(&upstream.body, "instanceId") {
            let first_running_read = self
                .instances
                .get(&id)
                .is_some_and(|i| !i.stuck && now >= i.pending_until && i.flaps_until.is_none())
                && named.contains(&id);
            let flap_for = if first_running_read {
                self.sample("ec2-flap", &rule.flap_for)
            } else {
                Duration::ZERO
            };
            let Some(instance) = self.instances.get_mut(&id) else {
                continue;
            };
            if instance.stuck || now < instance.pending_until {
                text = with_state_pending(&text, &id);
                pending = true;
                continue;
            }
            if !named.contains(&id) {
                continue;
            }
            let n = instance.reads;
            instance.reads += 1;
            match instance.flaps_until {
                None => instance.flaps_until = Some(now + flap_for),
                Some(until)
                    if now < until
                        && draw(seed, stream_of(&format!("ec2-flap-{}", instance.launch)), n)
                            < rule.flap_missing_probability =>
                {
                    record.fault = Some(Applied::InstanceMissing);
                    return Some(shapes::error(
                        call,
                        ErrorKind::NotFound,
                        &format!("The instance ID '{id}' does not exist"),
                    ));
                }
                Some(_) => {}
            }
        }
        if pending {
            record.fault = Some(Applied::InstancePending);
            upstream.body = Bytes::from(text);
            upstream.headers.remove(http::header::CONTENT_LENGTH);
        }
        None
    }

    /// A call moto answered with `upstream`; `answered` says whether the caller gets it.
    pub(super) fn observe(&mut self, call: &Call, upstream: &Upstream, answered: bool) {
        if !upstream.status.is_success() {
            return;
        }
        if let Some(key) = client_token_key(call) {
            let first = TokenUse {
                params: token_parameters(call),
                answer: upstream.clone(),
            };
            self.client_tokens.entry(key).or_insert(first);
        }
        let now = Instant::now();
        if call.service == "ec2" && call.operation == "RunInstances" {
            self.observe_launch(call, upstream, now);
        }
        if call.is_create() {
            self.observe_create(call, upstream, now, answered);
        } else if call.is_delete() {
            self.observe_delete(call, now);
        } else if call.is_read() {
            self.observe_read(call, upstream);
        }
    }

    /// A create: its new resources start their create lag and end any delete lag; a new role
    /// starts propagating, a new group's name is kept, a new deployment gets its lifecycle.
    fn observe_create(&mut self, call: &Call, upstream: &Upstream, now: Instant, answered: bool) {
        let service = call.service.clone();
        let keys = created_keys(call, upstream);
        let lag = self.lag_rule(&service).and_then(|r| r.after_create.clone());
        if let Some(lag) = lag {
            let until = now + self.sample(&format!("create-lag/{service}"), &lag);
            for key in &keys {
                let lagging = Lagging {
                    until,
                    reads: 0,
                    answered,
                };
                self.created.insert((service.clone(), key.clone()), lagging);
            }
        }
        for key in &keys {
            self.deleted.remove(&(service.clone(), key.clone()));
        }
        if service == "iam" && call.operation == "CreateRole" {
            let propagation = self.rules.assume_role.propagation.clone();
            let assumable_at = now + self.sample("assume-role", &propagation);
            for arn in keys.iter().filter(|k| k.starts_with("arn:")) {
                self.roles.insert(arn.clone(), assumable_at);
            }
        }
        if service == "greengrass" && call.operation == "CreateGroup" {
            let answer = serde_json::from_slice::<serde_json::Value>(&upstream.body).ok();
            if let Some(answer) = answer {
                if let (Some(id), Some(name)) = (answer["Id"].as_str(), answer["Name"].as_str()) {
                    self.group_names.insert(id.into(), name.into());
                }
            }
        }
        if service == "greengrass" && call.operation == "CreateDeployment" {
            let id = serde_json::from_slice::<serde_json::Value>(&upstream.body)
                .ok()
                .and_then(|v| v["DeploymentId"].as_str().map(str::to_string));
            if let Some(id) = id {
                self.observe_deployment(call, id, now);
            }
        }
    }

    /// A new deployment: draws how long it builds and runs, and whether it fails (always, for
    /// a group whose name the rules doom).
    fn observe_deployment(&mut self, call: &Call, id: String, now: Instant) {
        let rule = self.rules.deployments.clone();
        let building = self.sample("deployment-building", &rule.building);
        let in_progress = self.sample("deployment-in-progress", &rule.in_progress);
        let n = self.ordinal("deployment-outcome");
        let named = call
            .labels
            .iter()
            .find(|(label, _)| label == "GroupId")
            .and_then(|(_, group)| self.group_names.get(group))
            .is_some_and(|name| rule.fail_groups_named.iter().any(|p| name.starts_with(p)));
        let fails = named
            || draw(self.rules.seed, stream_of("deployment-outcome"), n) < rule.failure_probability;
        self.deployments.insert(
            id,
            Deployment {
                created: now,
                building,
                in_progress,
                fails,
            },
        );
    }

    /// A delete: the resources leave their create lag and start their delete lag; a deleted
    /// role no longer propagates.
    fn observe_delete(&mut self, call: &Call, now: Instant) {
        let service = call.service.clone();
        let delete_lag = self.lag_rule(&service).and_then(|r| r.after_delete.clone());
        let until = delete_lag.map(|d| now + self.sample(&format!("delete-lag/{service}"), &d));
        for r in &call.refs {
            let key = (service.clone(), r.clone());
            self.created.remove(&key);
            if let Some(until) = until {
                self.deleted.insert(key, until);
            }
        }
        if service == "iam" && call.operation == "DeleteRole" {
            if let Some(name) = call.param("RoleName") {
                let suffix = format!("/{name}");
                self.roles.retain(|arn, _| !arn.ends_with(&suffix));
            }
        }
    }

    /// A read: its answer is cached (the cache cleared when full) to replay during delete lag.
    fn observe_read(&mut self, call: &Call, upstream: &Upstream) {
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        for r in &call.refs {
            self.cache.insert(
                (call.service.clone(), call.operation.clone(), r.clone()),
                upstream.clone(),
            );
        }
    }
}

/// The resources a successful create made, by the identifiers in its answer, path and
/// parameters.
fn created_keys(call: &Call, upstream: &Upstream) -> Vec<String> {
    let mut keys = identifiers_in_answer(call.protocol, &upstream.body);
    // A create under a parent (a group's version) names the parent in its path and
    // answer; the parent is not new.
    keys.retain(|k| !call.labels.iter().any(|(_, v)| v == k));
    if call.names_resource_in_path {
        keys.extend(call.labels.last().map(|(_, v)| v.clone()));
    }
    if call.protocol == Protocol::Query {
        keys.extend(
            call.params
                .iter()
                .filter(|(k, _)| k.ends_with("Name") && k != "RoleSessionName")
                .map(|(_, v)| v.clone()),
        );
    }
    keys
}

/// The text of every `<name>` element of an XML answer, in order.
fn xml_values(body: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    text.split(open.as_str())
        .skip(1)
        .filter_map(|rest| rest.split(close.as_str()).next())
        .map(str::to_string)
        .collect()
}

/// `text` with the state of instance `id` (the first `<instanceState>` after its
/// `<instanceId>`, as moto and EC2 order an instance's fields) made `pending`.
fn with_state_pending(text: &str, id: &str) -> String {
    const PENDING: &str = "<instanceState><code>0</code><name>pending</name></instanceState>";
    let Some(at) = text.find(&format!("<instanceId>{id}</instanceId>")) else {
        return text.to_string();
    };
    let Some(start) = text[at..].find("<instanceState>").map(|s| at + s) else {
        return text.to_string();
    };
    let Some(end) = text[start..]
        .find("</instanceState>")
        .map(|e| start + e + "</instanceState>".len())
    else {
        return text.to_string();
    };
    format!("{}{PENDING}{}", &text[..start], &text[end..])
}
