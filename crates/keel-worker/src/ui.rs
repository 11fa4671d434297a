//! The web console at `/ui/` (docs/ui.md): plain HTML, CSS and JavaScript modules built into
//! the binary, served beside the API on its address. The files hold no data and need no
//! token; the page asks for the token, keeps it in the browser's session storage, and sends
//! it with each API call. Every answer forbids loading anything from another host
//! (`Content-Security-Policy`) and being framed by another page.

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};

/// The console's files: name under `/ui/`, content type, bytes.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../ui/style.css"),
    ),
];

/// Only this worker's own address: scripts, styles, images (inline SVG is part of the
/// page) and API calls; no frames, forms posting elsewhere, or plugins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self' data:; connect-src 'self'; form-action 'self'; \
                      base-uri 'none'; frame-ancestors 'none'";

/// Whether a request is for one of the console's files (served without the token).
pub(crate) fn is_asset(method: &Method, path: &str) -> bool {
    (*method == Method::GET || *method == Method::HEAD) && file(path).is_some()
}

/// The asset a path names: `/ui/` is the page itself.
fn file(path: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    let name = match path.strip_prefix("/ui")? {
        "" | "/" => "index.html",
        rest => rest.strip_prefix('/')?,
    };
    ASSETS.iter().find(|(n, _, _)| *n == name)
}

/// `GET /ui`: to `/ui/`, so the page's relative paths resolve.
pub(crate) async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/` and `GET /ui/{file}`.
pub(crate) async fn asset(uri: Uri) -> Response {
    let Some((_, content_type, body)) = file(uri.path()) else {
        return crate::api::ApiError::new(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("the console has no file {}", uri.path()),
        )
        .into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, *content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // A new binary's console is never mixed with an old one's cached files.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_files_and_nothing_else() {
        assert_eq!(file("/ui/").unwrap().0, "index.html");
        assert_eq!(file("/ui").unwrap().0, "index.html");
        assert_eq!(file("/ui/app.js").unwrap().0, "app.js");
        for other in [
            "/ui/../api-token",
            "/ui/app.js/",
            "/uix",
            "/ui//app.js",
            "/v1/runs",
        ] {
            assert!(file(other).is_none(), "{other}");
        }
        assert!(!is_asset(&Method::POST, "/ui/"));
    }
}
