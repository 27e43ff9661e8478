//! `GET /v1/queues`: how much unfinished work (pending or in flight) waits
//! per broker and per agent, the figure an operator watches to see a
//! broker falling behind or an agent stuck.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use switchyard_store::{AgentId, BrokerId};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use crate::state::HubState;

/// Unfinished work per broker and per agent.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Queues {
    brokers: Vec<BrokerQueue>,
    agents: Vec<AgentQueue>,
}

/// A broker's unfinished work: its agents' and its own broker-scoped calls.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BrokerQueue {
    broker_id: BrokerId,
    depth: i64,
}

/// An agent's unfinished dispatches and messages.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentQueue {
    agent_id: AgentId,
    broker_id: BrokerId,
    depth: i64,
}

/// Brokers and agents with no unfinished work are left out.
#[utoipa::path(
    get, path = "/v1/queues", operation_id = "show_queues", tag = "cluster",
    responses(
        (status = 200, description = "Unfinished work (pending or in flight) per broker and per agent", body = Queues),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database did not answer", body = ErrorBody),
    )
)]
pub(crate) async fn show(State(state): State<HubState>) -> Result<Json<Queues>, ApiError> {
    let rows = state.store.queue_depths_by_agent().await?;
    let mut brokers: BTreeMap<BrokerId, i64> = BTreeMap::new();
    let mut agents = Vec::new();
    for row in rows {
        *brokers.entry(row.broker_id).or_default() += row.depth;
        if let Some(agent_id) = row.agent_id {
            agents.push(AgentQueue {
                agent_id,
                broker_id: row.broker_id,
                depth: row.depth,
            });
        }
    }
    let brokers = brokers
        .into_iter()
        .map(|(broker_id, depth)| BrokerQueue { broker_id, depth })
        .collect();
    Ok(Json(Queues { brokers, agents }))
}
