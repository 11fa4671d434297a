//! What the worker's outgoing HTTP (notifications, trace export) shares: the check of a URL
//! an operator gives, and a connector for http and, only when needed, https.

use hyper_util::client::legacy::connect::HttpConnector;

/// A connector for http, and for https too when `https` is true.
pub(crate) type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// `text` as an absolute `http` or `https` URL with a host and without credentials;
/// `example` is shown in the refusal, and `instead` says what to do rather than credentials.
pub(crate) fn http_url(text: &str, example: &str, instead: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "{text:?} is not an http(s) URL with a host (e.g. {example})"
        ));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{text:?} carries credentials: {instead}"));
    }
    Ok(uri)
}

/// A connector for http, and for https too when `https` (the system's trusted roots are
/// loaded only then; without, an empty trust store that no https request gets through).
pub(crate) fn connector(https: bool) -> std::io::Result<HttpsConnector> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = if https {
        builder.with_native_roots()?
    } else {
        builder.with_tls_config(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    };
    Ok(builder.https_or_http().enable_http1().build())
}
