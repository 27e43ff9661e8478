//! HTTP routes of a replica.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::HubState;
use crate::api_error::ApiError;

/// How long readiness waits for the database before answering 503.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn router(state: HubState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::api::router(state.clone()))
        .layer(DefaultBodyLimit::max(crate::api::MAX_BODY_BYTES))
        .with_state(state)
}

/// Liveness: the process is serving requests.
async fn healthz(State(state): State<HubState>) -> Json<Value> {
    Json(json!({"status": "ok", "instance_id": state.replica_id}))
}

/// Readiness: the database answers a round trip in time and, on
/// PostgreSQL, the command bus listener is connected.
async fn readyz(State(state): State<HubState>) -> Result<Json<Value>, ApiError> {
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
    if state.listener.as_ref().is_some_and(|l| !l.is_connected()) {
        return Err(ApiError::not_ready("command bus listener is not connected"));
    }
    Ok(Json(json!({
        "status": "ready",
        "instance_id": state.replica_id,
        "backend": state.store.backend(),
    })))
}

async fn metrics(State(state): State<HubState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
