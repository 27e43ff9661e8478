//! The HTTP route table of a replica, and the three operator endpoints
//! (`/healthz`, `/readyz`, `/metrics`). Every `/v1` route but the control
//! channel and the API's own description (`/v1/openapi.json`) requires the
//! admin token.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::ToSchema;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::{
    AdminTokens, MAX_BODY_BYTES, agents, brokers, dispatches, events, messages, openapi, ops,
    require_admin,
};
use switchyard_proto::ATTACHMENT_PATH;
use switchyard_proto::poll::{MAX_POLL_REQUEST_BYTES, POLL_HELLO_PATH, POLL_PATH, REPORT_PATH};
use switchyard_store::ReplicaId;

use crate::metrics::Metrics;
use crate::session;
use crate::state::HubState;

/// How long readiness waits for the database before answering 503.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn router(state: HubState) -> Router {
    let admin = AdminTokens::new(state.store.clone());
    // A poll or report carries up to a thousand frames, more than any
    // API request.
    let poll_limit = DefaultBodyLimit::max(MAX_POLL_REQUEST_BYTES);
    // A message with files: the files, the message part and the form's
    // own bytes.
    let upload_limit = usize::try_from(state.config.max_attachment_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(2 * MAX_BODY_BYTES);
    let v1 = Router::new()
        .route("/v1/brokers", post(brokers::create).get(brokers::list))
        .route(
            "/v1/brokers/{broker}",
            get(brokers::show).delete(brokers::remove),
        )
        .route("/v1/agents", post(agents::create).get(agents::list))
        .route(
            "/v1/agents/{agent}",
            get(agents::show).delete(agents::remove),
        )
        .route("/v1/agents/{agent}/start", post(agents::start))
        .route("/v1/agents/{agent}/stop", post(agents::stop))
        .route("/v1/agents/{agent}/restart", post(agents::restart))
        .route("/v1/agents/{agent}/ops/{name}", post(ops::call))
        .route("/v1/brokers/{broker}/ops/{name}", post(ops::broker_call))
        .route(
            "/v1/agents/{agent}/messages",
            post(messages::send).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/messages", post(messages::send_batch))
        .route(
            "/v1/messages/{id}",
            get(messages::show).delete(messages::cancel),
        )
        .route("/v1/dispatches", get(dispatches::list))
        .route("/v1/dispatches/{id}", get(dispatches::show))
        .route("/v1/dispatches/{id}/cancel", post(dispatches::cancel))
        .route("/v1/cluster", get(dispatches::cluster))
        .route("/v1/queues", get(crate::api::queues::show))
        .route("/v1/events", get(events::stream))
        .route_layer(middleware::from_fn_with_state(admin, require_admin))
        .route(openapi::PATH, get(openapi::document))
        .route("/v1/brokers/connect", get(session::connect))
        .route(
            POLL_HELLO_PATH,
            post(session::poll::hello).layer(poll_limit),
        )
        .route(POLL_PATH, post(session::poll::poll).layer(poll_limit))
        .route(REPORT_PATH, post(session::poll::report).layer(poll_limit))
        .route(ATTACHMENT_PATH, get(session::files::fetch))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .merge(v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(catch_panic(state.metrics.clone()))
        .with_state(state)
}

/// A handler that panics answers a JSON 500 `internal` (and is counted in
/// `switchyard_http_panics_total`) instead of dropping the connection with
/// no answer; the replica goes on serving.
fn catch_panic(
    metrics: Metrics,
) -> CatchPanicLayer<impl Fn(Box<dyn std::any::Any + Send>) -> Response + Clone> {
    CatchPanicLayer::custom(move |panic: Box<dyn std::any::Any + Send>| {
        metrics.http_panics.inc();
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %what, "an HTTP handler panicked");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request may or may not have taken effect",
        )
        .into_response()
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    #[schema(example = "ok")]
    status: &'static str,
    instance_id: ReplicaId,
}

/// `GET /readyz` when ready.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Ready {
    #[schema(example = "ready")]
    status: &'static str,
    instance_id: ReplicaId,
    /// `sqlite` or `postgres`.
    backend: &'static str,
}

/// Liveness: the process is serving requests.
#[utoipa::path(
    get, path = "/healthz", operation_id = "healthz", tag = "operator", security(()),
    responses((status = 200, description = "The process serves requests", body = Health))
)]
pub(crate) async fn healthz(State(state): State<HubState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        instance_id: state.replica_id,
    })
}

/// Readiness: the database answers a round trip in time and the bus is
/// listening (on PostgreSQL, the LISTEN connection is up).
#[utoipa::path(
    get, path = "/readyz", operation_id = "readyz", tag = "operator", security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Ready),
        (status = 503, description = "`not_ready`: the database did not answer within 2 s, or the command bus listener is down", body = ErrorBody),
    )
)]
pub(crate) async fn readyz(State(state): State<HubState>) -> Result<Json<Ready>, ApiError> {
    let ping = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    let outcome = match ping {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("database unreachable: {err}")),
        Err(_) => Err(format!(
            "database did not answer within {}s",
            READY_TIMEOUT.as_secs()
        )),
    };
    state.metrics.database_up.set(i64::from(outcome.is_ok()));
    outcome.map_err(ApiError::not_ready)?;
    if !state.bus.is_listening() {
        return Err(ApiError::not_ready("command bus listener is not connected"));
    }
    Ok(Json(Ready {
        status: "ready",
        instance_id: state.replica_id,
        backend: state.store.backend(),
    }))
}

/// Prometheus metrics of this replica.
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics", tag = "operator", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String))
)]
pub(crate) async fn metrics(State(state): State<HubState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    /// A panicking handler answers a JSON 500 `internal` over a real socket
    /// and is counted; the server goes on answering.
    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500_and_is_counted() {
        let metrics = Metrics::new("test");
        let app = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(catch_panic(metrics.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();

        let resp = http
            .get(format!("http://{addr}/boom"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 500);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal", "{body}");
        assert_eq!(metrics.http_panics.get(), 1);

        let resp = http
            .get(format!("http://{addr}/fine"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the server still answers");
        server.abort();
    }
}
