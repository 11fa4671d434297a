//! Error answers in each service's real shape, so the SDK parses them as it would AWS's.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{http, Response};

use super::classify::{Call, Protocol};

/// The kinds of error the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    Throttle,
    Server(u16),
    NotFound,
    AccessDenied,
    /// EC2: a client token used again with other parameters.
    IdempotentParameterMismatch,
}

/// The error answer of `kind` for the service of `call`.
pub(crate) fn error(call: &Call, kind: ErrorKind, message: &str) -> Response<Full<Bytes>> {
    let (status, code) = code(call, kind);
    match call.protocol {
        Protocol::Query => {
            let namespace = if call.service == "sts" {
                "https://sts.amazonaws.com/doc/2011-06-15/"
            } else {
                "https://iam.amazonaws.com/doc/2010-05-08/"
            };
            let fault = if status >= 500 { "Receiver" } else { "Sender" };
            let body = format!(
                "<ErrorResponse xmlns=\"{namespace}\"><Error><Type>{fault}</Type><Code>{code}</Code>\
                 <Message>{}</Message></Error><RequestId>keel-fault-proxy</RequestId></ErrorResponse>",
                xml_escape(message)
            );
            respond(status, "text/xml", code, body)
        }
        Protocol::Ec2Query => {
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
                 <Message>{}</Message></Error></Errors><RequestID>keel-fault-proxy</RequestID></Response>",
                xml_escape(message)
            );
            respond(status, "text/xml;charset=UTF-8", code, body)
        }
        Protocol::RestJson => {
            let body = serde_json::json!({ "message": message, "__type": code }).to_string();
            respond(status, "application/json", code, body)
        }
    }
}

/// (status, error code) per service, as AWS answers them.
fn code(call: &Call, kind: ErrorKind) -> (u16, &'static str) {
    let service = call.service.as_str();
    match (kind, service) {
        // EC2 throttles with a 503 of its own code, which the SDK classes as throttling.
        (ErrorKind::Throttle, "ec2") => (503, "RequestLimitExceeded"),
        (ErrorKind::Server(503), "ec2") => (503, "Unavailable"),
        (ErrorKind::Server(s), "ec2") => (s, "InternalError"),
        (ErrorKind::NotFound, "ec2") => {
            let volume = call.refs.iter().any(|r| r.starts_with("vol-"));
            if volume {
                (400, "InvalidVolume.NotFound")
            } else {
                (400, "InvalidInstanceID.NotFound")
            }
        }
        (ErrorKind::AccessDenied, "ec2") => (403, "UnauthorizedOperation"),
        (ErrorKind::IdempotentParameterMismatch, _) => (400, "IdempotentParameterMismatch"),
        (ErrorKind::Throttle, "iam" | "sts") => (400, "Throttling"),
        (ErrorKind::Throttle, "greengrass") => (429, "TooManyRequestsException"),
        (ErrorKind::Throttle, _) => (429, "ThrottlingException"),
        (ErrorKind::Server(503), "iam" | "sts") => (503, "ServiceUnavailable"),
        (ErrorKind::Server(s), "iam" | "sts") => (s, "InternalFailure"),
        (ErrorKind::Server(503), _) => (503, "ServiceUnavailableException"),
        (ErrorKind::Server(s), "greengrass") => (s, "InternalServerErrorException"),
        (ErrorKind::Server(s), _) => (s, "InternalFailureException"),
        (ErrorKind::NotFound, "iam") => (404, "NoSuchEntity"),
        // moto answers a missing Greengrass group or definition this way.
        (ErrorKind::NotFound, "greengrass") => (404, "IdNotFoundException"),
        (ErrorKind::NotFound, _) => (404, "ResourceNotFoundException"),
        (ErrorKind::AccessDenied, "iam" | "sts") => (403, "AccessDenied"),
        (ErrorKind::AccessDenied, _) => (403, "AccessDeniedException"),
    }
}

fn respond(status: u16, content_type: &str, code: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header("x-amzn-ErrorType", code)
        .header("x-amzn-RequestId", "keel-fault-proxy")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// A JSON answer with status 200.
pub(crate) fn json(body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
