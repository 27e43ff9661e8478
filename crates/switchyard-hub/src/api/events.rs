//! `GET /v1/events`: Server-Sent Events of agent status changes and
//! finished dispatches, from any replica (events of other replicas arrive
//! through the command bus). `?agent=` narrows to one agent (id or name).
//! Delivery is best effort: a client that falls behind gets a `lagged`
//! event and should re-read what it watches.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use switchyard_store::AgentId;
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::request::Query;
use crate::events::HubEvent;
use crate::lookup;
use crate::state::HubState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    agent: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/events", operation_id = "stream_events", tag = "events",
    params(("agent" = Option<String>, Query, description = "Only this agent's events (id or name)")),
    responses(
        (status = 200, description = "Server-Sent Events, until the client or the replica goes away: `agent_status`, `dispatch_finished`, `lagged` (see docs/api.md, Events)", content_type = "text/event-stream", body = String),
        (status = 400, description = "`bad_request`: a query that does not parse", body = super::error::ErrorBody),
        (status = 401, description = "`unauthorized`", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such agent", body = super::error::ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the query", body = super::error::ErrorBody),
        (status = 503, description = "`unavailable`", body = super::error::ErrorBody),
    )
)]
pub(crate) async fn stream(
    State(state): State<HubState>,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let agent: Option<AgentId> = match query.agent {
        Some(reference) => Some(lookup::agent(&*state.store, &reference).await?.id),
        None => None,
    };
    let receiver = state.events.subscribe();
    let shutdown = state.shutdown.clone();
    let events = futures::stream::unfold(
        (receiver, shutdown),
        move |(mut receiver, shutdown)| async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return None,
                    next = receiver.recv() => next,
                };
                let event = match next {
                    Ok(HubEvent::AgentStatus(row)) if agent.is_none_or(|a| a == row.id) => {
                        Event::default()
                            .event("agent_status")
                            .json_data(json!({ "agent": row }))
                    }
                    Ok(HubEvent::DispatchFinished(row))
                        if agent.is_none_or(|a| Some(a) == row.agent_id) =>
                    {
                        Event::default()
                            .event("dispatch_finished")
                            .json_data(json!({ "dispatch": row }))
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => Event::default()
                        .event("lagged")
                        .json_data(json!({ "missed": missed })),
                    Err(RecvError::Closed) => return None,
                };
                match event {
                    Ok(event) => return Some((Ok(event), (receiver, shutdown))),
                    Err(err) => tracing::warn!(%err, "cannot encode an event"),
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
