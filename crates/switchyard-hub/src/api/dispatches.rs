//! `/v1/dispatches` (intents) and `/v1/cluster` (replicas and the brokers
//! each owns).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_store::{CancelOutcome, DispatchIntent, IntentFilter, IntentId, IntentState};

use super::error::ApiError;
use super::request::{Path, Query};
use crate::events::HubEvent;
use crate::lookup;
use crate::state::HubState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    broker_id: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

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

pub(crate) async fn cluster(State(state): State<HubState>) -> Result<Json<Value>, ApiError> {
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
    let replicas: Vec<Value> = replicas
        .into_iter()
        .map(|r| {
            let brokers = owned.remove(&r.instance_id).unwrap_or_default();
            json!({
                "instance_id": r.instance_id,
                "address": r.address,
                "started_at": r.started_at,
                "last_seen": r.last_seen,
                "brokers": brokers,
            })
        })
        .collect();
    let hub_id = state.store.hub_id().await?;
    Ok(Json(json!({ "hub_id": hub_id, "replicas": replicas })))
}
