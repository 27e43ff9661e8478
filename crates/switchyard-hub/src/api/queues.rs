//! `GET /v1/queues`: how much unfinished work (pending or in flight) waits
//! per broker and per agent, the figure an operator watches to see a
//! broker falling behind or an agent stuck.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::state::HubState;

/// Brokers and agents with no unfinished work are left out. A broker's
/// depth counts its agents' work and its own broker-scoped calls.
pub(crate) async fn show(State(state): State<HubState>) -> Result<Json<Value>, ApiError> {
    let rows = state.store.queue_depths_by_agent().await?;
    let mut brokers: BTreeMap<_, i64> = BTreeMap::new();
    let mut agents = Vec::new();
    for row in rows {
        *brokers.entry(row.broker_id).or_default() += row.depth;
        if let Some(agent) = row.agent_id {
            agents.push(json!({
                "agent_id": agent,
                "broker_id": row.broker_id,
                "depth": row.depth,
            }));
        }
    }
    let brokers: Vec<Value> = brokers
        .into_iter()
        .map(|(broker, depth)| json!({ "broker_id": broker, "depth": depth }))
        .collect();
    Ok(Json(json!({ "brokers": brokers, "agents": agents })))
}
