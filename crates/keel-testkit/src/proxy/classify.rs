//! Which AWS service and operation a request is, and which resources it names.

use std::collections::BTreeSet;

use hyper::http;

use super::operations::REST_OPERATIONS;

/// How a service encodes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// IAM and STS: a form body with `Action=...`, XML answers.
    Query,
    /// EC2: a form body with `Action=...` as for IAM, XML answers, and errors in EC2's own
    /// shape (`<Response><Errors><Error>`).
    Ec2Query,
    /// IoT and Greengrass: method and path name the operation, JSON answers.
    RestJson,
}

/// One classified request.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The SigV4 signing name: `iam`, `sts`, `iot`, `greengrass`, `ec2` (or `unknown`).
    pub service: String,
    /// The access key id the request was signed with: which account it acts in.
    pub access_key: String,
    /// The operation, for example `CreateRole` (or `Unknown`).
    pub operation: String,
    pub protocol: Protocol,
    /// Form (query protocol) or URL query parameters.
    pub params: Vec<(String, String)>,
    /// Path labels of a REST operation, by the name in its URI template.
    pub labels: Vec<(String, String)>,
    /// Whether the operation's URI template ends in a label (`/things/{thingName}`): a create of
    /// this shape names the new resource in its path.
    pub names_resource_in_path: bool,
    /// Every value in the request that can name a resource: path labels, parameters, string
    /// values of a JSON body, the `x-amzn-principal` header.
    pub refs: BTreeSet<String>,
}

impl Call {
    /// A create of a new resource (as opposed to a read, a use, or a delete).
    pub(super) fn is_create(&self) -> bool {
        self.operation.starts_with("Create") || self.operation.starts_with("Register")
    }

    /// A delete of a resource.
    pub(super) fn is_delete(&self) -> bool {
        self.operation.starts_with("Delete")
    }

    /// A read that returns a resource's description (answerable from a cached answer).
    pub(super) fn is_read(&self) -> bool {
        self.operation.starts_with("Get") || self.operation.starts_with("Describe")
    }

    /// The value of a form or query parameter.
    pub(super) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a path label.
    pub(super) fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Classifies a request from its head and body.
pub(crate) fn classify(parts: &http::request::Parts, body: &[u8]) -> Call {
    let authorization = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let service = authorization
        .and_then(signing_service)
        .unwrap_or("unknown")
        .to_string();
    let access_key = authorization
        .and_then(|a| credential_scope(a).split('/').next())
        .unwrap_or("")
        .to_string();
    let mut params: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut refs = BTreeSet::new();
    let protocol = match service.as_str() {
        "iam" | "sts" => Protocol::Query,
        "ec2" => Protocol::Ec2Query,
        _ => Protocol::RestJson,
    };
    let mut labels = Vec::new();
    let mut names_resource_in_path = false;
    let operation = match protocol {
        Protocol::Query | Protocol::Ec2Query => {
            params.extend(form_urlencoded::parse(body).into_owned());
            params
                .iter()
                .find(|(k, _)| k == "Action")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "Unknown".into())
        }
        Protocol::RestJson => {
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
                collect_json_strings(&json, &mut refs, 0);
            }
            match rest_operation(&service, parts.method.as_str(), parts.uri.path()) {
                Some(m) => {
                    labels = m.labels;
                    names_resource_in_path = m.ends_in_label;
                    m.operation.to_string()
                }
                None => "Unknown".into(),
            }
        }
    };
    for (k, v) in &params {
        if k != "Action" && k != "Version" {
            refs.insert(v.clone());
        }
    }
    for (_, v) in &labels {
        refs.insert(v.clone());
    }
    if let Some(principal) = parts
        .headers
        .get("x-amzn-principal")
        .and_then(|v| v.to_str().ok())
    {
        refs.insert(principal.to_string());
    }
    refs.retain(|r| !r.is_empty());
    Call {
        service,
        access_key,
        operation,
        protocol,
        params,
        labels,
        names_resource_in_path,
        refs,
    }
}

/// The service of a SigV4 `Authorization` header: `Credential=AKID/DATE/REGION/SERVICE/aws4_request`.
fn signing_service(authorization: &str) -> Option<&str> {
    credential_scope(authorization).split('/').nth(3)
}

/// The `AKID/DATE/REGION/SERVICE/aws4_request` of a SigV4 `Authorization` header (empty
/// when it has none).
fn credential_scope(authorization: &str) -> &str {
    authorization
        .split("Credential=")
        .nth(1)
        .and_then(|credential| credential.split([',', ' ']).next())
        .unwrap_or("")
}

/// Finds the REST operation whose method and URI template match; among several, the one with
/// the most literal segments wins (`/things/{name}/principals` over a bare label).
fn rest_operation(service: &str, method: &str, path: &str) -> Option<RestMatch> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut best: Option<(usize, RestMatch)> = None;
    for (svc, m, template, name) in REST_OPERATIONS {
        if *svc != service || *m != method {
            continue;
        }
        let parts: Vec<&str> = template.trim_matches('/').split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut labels = Vec::new();
        let mut literals = 0;
        let matched = parts.iter().zip(&segments).all(|(t, s)| {
            if let Some(label) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                labels.push((label.to_string(), percent_decode(s)));
                !s.is_empty()
            } else {
                literals += 1;
                *t == percent_decode(s)
            }
        });
        if matched && best.as_ref().is_none_or(|(l, _)| literals > *l) {
            best = Some((
                literals,
                RestMatch {
                    operation: name,
                    labels,
                    ends_in_label: template.ends_with('}'),
                },
            ));
        }
    }
    best.map(|(_, m)| m)
}

/// A matched REST operation.
struct RestMatch {
    operation: &'static str,
    labels: Vec<(String, String)>,
    ends_in_label: bool,
}

fn collect_json_strings(value: &serde_json::Value, out: &mut BTreeSet<String>, depth: usize) {
    if depth > 8 {
        return;
    }
    match value {
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        serde_json::Value::Array(items) => items
            .iter()
            .for_each(|v| collect_json_strings(v, out, depth + 1)),
        serde_json::Value::Object(map) => map
            .values()
            .for_each(|v| collect_json_strings(v, out, depth + 1)),
        _ => {}
    }
}

/// Decodes `%XX` escapes of a path segment (a `+` stays a `+` in a path).
pub(crate) fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Identifiers in a create's answer: values of JSON fields or XML elements whose name ends in
/// `Arn`, `Id` or `Name` (not request ids, not version ids).
pub(crate) fn identifiers_in_answer(protocol: Protocol, body: &[u8]) -> Vec<String> {
    let identifying = |field: &str| {
        let f = field.to_ascii_lowercase();
        (f.ends_with("arn") || f.ends_with("id") || f.ends_with("name"))
            && !f.contains("version")
            && f != "requestid"
    };
    let mut out = Vec::new();
    match protocol {
        Protocol::RestJson => {
            if let Ok(serde_json::Value::Object(map)) =
                serde_json::from_slice::<serde_json::Value>(body)
            {
                for (k, v) in map {
                    if let (true, Some(s)) = (identifying(&k), v.as_str()) {
                        out.push(s.to_string());
                    }
                }
            }
        }
        Protocol::Query | Protocol::Ec2Query => {
            let text = String::from_utf8_lossy(body);
            let mut rest = text.as_ref();
            while let Some(open) = rest.find('<') {
                rest = &rest[open + 1..];
                let Some(close) = rest.find('>') else { break };
                let tag = &rest[..close];
                let after = &rest[close + 1..];
                if !tag.starts_with('/') && identifying(tag) {
                    if let Some(end) = after.find(&format!("</{tag}>")) {
                        let value = &after[..end];
                        if !value.contains('<') && !value.is_empty() {
                            out.push(value.to_string());
                        }
                    }
                }
                rest = after;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, service: &str) -> http::request::Parts {
        let auth = format!("AWS4-HMAC-SHA256 Credential=AK/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0");
        let (parts, ()) = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", auth)
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    #[test]
    fn query_protocol_names_the_action_and_its_parameters() {
        let call = classify(
            &parts("POST", "/", "iam"),
            b"Action=CreateRole&Version=2010-05-08&RoleName=r1",
        );
        assert_eq!(
            (call.service.as_str(), call.operation.as_str()),
            ("iam", "CreateRole")
        );
        assert!(call.refs.contains("r1") && !call.refs.contains("CreateRole"));
        assert!(call.is_create());
    }

    #[test]
    fn rest_operations_prefer_the_most_literal_template() {
        let call = classify(&parts("GET", "/things/t%3A1/principals", "iot"), b"");
        assert_eq!(call.operation, "ListThingPrincipals");
        assert_eq!(call.label("thingName"), Some("t:1"));
        let call = classify(&parts("GET", "/things/t1", "iot"), b"");
        assert_eq!(call.operation, "DescribeThing");
        assert!(call.names_resource_in_path);
        let call = classify(
            &parts(
                "POST",
                "/greengrass/groups/g1/deployments/$reset",
                "greengrass",
            ),
            b"",
        );
        assert_eq!(call.operation, "ResetDeployments");
        let call = classify(
            &parts(
                "GET",
                "/greengrass/groups/g1/deployments/d1/status",
                "greengrass",
            ),
            b"",
        );
        assert_eq!(
            (call.operation.as_str(), call.label("DeploymentId")),
            ("GetDeploymentStatus", Some("d1"))
        );
    }

    #[test]
    fn unknown_requests_are_named_unknown() {
        let call = classify(&parts("GET", "/nothing/here/at/all", "iot"), b"");
        assert_eq!(call.operation, "Unknown");
        let (p, ()) = http::Request::builder()
            .uri("/")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(classify(&p, b"").service, "unknown");
    }

    #[test]
    fn identifiers_come_from_json_fields_and_xml_elements() {
        let json = br#"{"thingName":"t1","thingArn":"arn:t1","thingId":"x","policyVersionId":"1"}"#;
        let mut ids = identifiers_in_answer(Protocol::RestJson, json);
        ids.sort();
        assert_eq!(ids, ["arn:t1", "t1", "x"]);
        let xml = b"<R><Role><Arn>arn:r</Arn><RoleName>r</RoleName><DefaultVersionId>v1</DefaultVersionId></Role><RequestId>q</RequestId></R>";
        assert_eq!(identifiers_in_answer(Protocol::Query, xml), ["arn:r", "r"]);
    }

    #[test]
    fn percent_decoding_leaves_plus_and_bad_escapes_alone() {
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b+c%zz%4");
    }
}
