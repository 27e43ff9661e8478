//! `/v1/dispatches` (intents) and `/v1/cluster` (replicas and the brokers
//! each owns).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchyard_store::{
    BrokerId, CancelOutcome, DispatchIntent, IntentFilter, IntentId, IntentState, ReplicaId,
};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::request::{Path, Query};
use crate::events::HubEvent;
use crate::lookup;
use crate::state::HubState;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this broker's dispatches (id or name).
    broker_id: Option<String>,
    /// Only dispatches in this state.
    #[param(value_type = Option<IntentState>)]
    state: Option<String>,
    /// At most this many, newest first: 1 to 1,000 (default 100; out of
    /// range is clamped).
    limit: Option<u32>,
}

/// `GET /v1/cluster`: which hub this is and its live replicas.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Cluster {
    /// The same on every replica of one database; a copy from SQLite
    /// keeps the SQLite hub's.
    hub_id: switchyard_store::HubId,
    replicas: Vec<ReplicaInfo>,
}

/// A live replica and the brokers whose sessions it holds.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplicaInfo {
    instance_id: ReplicaId,
    /// Where other replicas reach it.
    address: String,
    started_at: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    brokers: Vec<BrokerId>,
}

#[utoipa::path(
    get, path = "/v1/dispatches", operation_id = "list_dispatches", tag = "dispatches",
    params(ListQuery),
    responses(
        (status = 200, description = "Dispatches, newest first", body = Vec<DispatchIntent>),
        (status = 400, description = "`bad_request`: a query that does not parse, an unknown `state`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such broker", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the query", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<HubState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<DispatchIntent>>, ApiError> {
    let broker_id = match query.broker_id {
        Some(reference) => Some(lookup::broker(&*state.store, &reference).await?.id),
        None => None,
    };
    let state_filter = match query.state {
        Some(word) => Some(word.parse::<IntentState>().map_err(|_| {
            ApiError::bad_request(
                "state must be one of pending, in_progress, done, failed, cancelled",
            )
        })?),
        None => None,
    };
    let filter = IntentFilter {
        broker_id,
        state: state_filter,
        limit: query.limit.unwrap_or(100).clamp(1, 1000),
    };
    Ok(Json(state.store.list_intents(filter).await?))
}

#[utoipa::path(
    get, path = "/v1/dispatches/{id}", operation_id = "show_dispatch", tag = "dispatches",
    params(("id" = String, Path, description = "The dispatch's id (a UUID)")),
    responses(
        (status = 200, description = "The dispatch", body = DispatchIntent),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<HubState>,
    Path(id): Path<String>,
) -> Result<Json<DispatchIntent>, ApiError> {
    let id: IntentId = id
        .parse()
        .map_err(|_| ApiError::bad_request("dispatch id must be a UUID"))?;
    Ok(Json(state.store.intent(id).await?))
}

/// `POST /v1/dispatches/{id}/cancel`: withdraws a dispatch that has not
/// been sent. The state change is durable, so every replica's drain honours
/// it (a claim only takes `pending` rows); waiting callers learn it from
/// the finished-dispatch event. Cancelling a cancelled dispatch answers the
/// same; one already sent or finished is a 409 naming its state.
#[utoipa::path(
    post, path = "/v1/dispatches/{id}/cancel", operation_id = "cancel_dispatch", tag = "dispatches",
    params(("id" = String, Path, description = "The dispatch's id (a UUID)")),
    responses(
        (status = 200, description = "The dispatch, `cancelled` (also when it was before)", body = DispatchIntent),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`not_pending`, with `dispatch_id`: already sent or finished; nothing changes", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    State(state): State<HubState>,
    Path(id): Path<String>,
) -> Result<Json<DispatchIntent>, ApiError> {
    let id: IntentId = id
        .parse()
        .map_err(|_| ApiError::bad_request("dispatch id must be a UUID"))?;
    let (row, outcome) = state.store.cancel_intent(id).await?;
    if outcome == CancelOutcome::NotPending {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pending",
            format!(
                "the dispatch is {}: only a pending dispatch can be cancelled",
                row.state
            ),
        )
        .with_dispatch(row.id.0));
    }
    // Once: a repeated cancel changes nothing and tells nobody.
    if outcome == CancelOutcome::Cancelled {
        state.bus.publish(HubEvent::DispatchFinished(row.clone()));
    }
    Ok(Json(row))
}

#[utoipa::path(
    get, path = "/v1/cluster", operation_id = "show_cluster", tag = "cluster",
    responses(
        (status = 200, description = "The live replicas", body = Cluster),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn cluster(State(state): State<HubState>) -> Result<Json<Cluster>, ApiError> {
    let replicas = state
        .store
        .live_replicas(state.config.replica_stale_after)
        .await?;
    let mut owned: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for broker in state.store.list_brokers().await? {
        if let Some(replica) = broker.connected_replica {
            owned.entry(replica).or_default().push(broker.id);
        }
    }
    let replicas = replicas
        .into_iter()
        .map(|r| ReplicaInfo {
            brokers: owned.remove(&r.instance_id).unwrap_or_default(),
            instance_id: r.instance_id,
            address: r.address,
            started_at: r.started_at,
            last_seen: r.last_seen,
        })
        .collect();
    let hub_id = state.store.hub_id().await?;
    Ok(Json(Cluster { hub_id, replicas }))
}
