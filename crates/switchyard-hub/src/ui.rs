//! The operator dashboard at `/ui`: a page, a script and a stylesheet
//! compiled into the binary, so a replica serves its own dashboard with
//! nothing fetched from anywhere else. The page holds no data: it asks the
//! operator for the admin token and reads the `/v1` API and its event
//! stream with it (`docs/dashboard.md`), so these routes need no token.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Everything the page may load or call is on this origin: no inline
/// script or style, no other host, no plugins, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The assets change only with the binary; a browser asks again (cheaply)
/// instead of running a dashboard older than its hub.
const CACHE_CONTROL: &str = "no-cache";

/// The dashboard's files: path under `/ui`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../assets/ui/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/ui/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/ui/style.css"),
    ),
    (
        "/icon.png",
        "image/png",
        include_bytes!("../assets/ui/icon.png"),
    ),
];

/// `/ui` (also `/ui/`) and its assets.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route("/ui", get(dashboard))
        .route("/ui/", get(dashboard));
    for &(path, content_type, bytes) in &ASSETS[1..] {
        router = router.route(
            &format!("/ui{path}"),
            get(move || serve(content_type, bytes)),
        );
    }
    router
}

/// The page (also at `/ui/`); its assets (`/ui/app.js`, `/ui/style.css`,
/// `/ui/icon.png`) are served the same way.
#[utoipa::path(
    get, path = "/ui", operation_id = "dashboard", tag = "operator", security(()),
    responses((status = 200, description = "The operator dashboard (an HTML page that asks for the admin token; see docs/dashboard.md)", content_type = "text/html; charset=utf-8", body = String))
)]
pub(crate) async fn dashboard() -> impl IntoResponse {
    serve(ASSETS[0].1, ASSETS[0].2).await
}

async fn serve(content_type: &'static str, bytes: &'static [u8]) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static(CACHE_CONTROL),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ),
        ],
        bytes,
    )
}
