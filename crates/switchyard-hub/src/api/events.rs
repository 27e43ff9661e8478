//! `GET /v1/events`: Server-Sent Events from the durable event log, on any
//! replica. Each event carries its log id as the SSE `id:`. A client that
//! reconnects with `Last-Event-ID` gets a `resume` event, then every event
//! after that id it missed (from the log, whichever replica wrote it and
//! across restarts), then live events; when the log no longer holds what
//! it missed (past retention, or an id this hub never gave) the `resume`
//! event says `recovered: false` and the stream goes on from now. A client
//! too slow for the live fan-out catches up from the log the same way.
//! `?agent=` narrows to one agent's events (id or name).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use switchyard_store::{AgentId, LoggedEvent, MAX_EVENTS_PER_READ, Store, StoreError};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::request::Query;
use crate::lookup;
use crate::state::HubState;

/// The header a reconnecting SSE client sends with the last id it saw.
const LAST_EVENT_ID: &str = "last-event-id";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    agent: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/events", operation_id = "stream_events", tag = "events",
    params(
        ("agent" = Option<String>, Query, description = "Only this agent's events (id or name)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event a reconnecting client saw: it gets what it missed, then live events"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events from the durable event log, each with its log id as `id:`, until the client or the replica goes away: `agent_status`, `dispatch_finished`, `broker_online`, `broker_offline`, `message_delivered`, `message_expired`, `message_failed`, and `resume` first after a reconnect with `Last-Event-ID` (see docs/api.md, Events)", content_type = "text/event-stream", body = String),
        (status = 400, description = "`bad_request`: a query that does not parse; `invalid_request`: a `Last-Event-ID` that is not a non-negative integer", body = super::error::ErrorBody),
        (status = 401, description = "`unauthorized`", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such agent", body = super::error::ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the query", body = super::error::ErrorBody),
        (status = 503, description = "`unavailable`", body = super::error::ErrorBody),
    )
)]
pub(crate) async fn stream(
    State(state): State<HubState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let resume_from = last_event_id(&headers)?;
    let agent: Option<AgentId> = match query.agent {
        Some(reference) => Some(lookup::agent(&*state.store, &reference).await?.id),
        None => None,
    };
    // The log's end now, then the subscription: whatever is appended from
    // here on reaches this client live or through its replay, never
    // neither (see `EventLog::subscribe_from`).
    let bounds = state.store.event_bounds().await?;
    let live = state.events.log().subscribe_from(bounds.last);
    let mut reader = Reader {
        store: state.store.clone(),
        live,
        agent,
        sent: 0,
        replaying: false,
        ready: VecDeque::new(),
        shutdown: state.shutdown.clone(),
    };
    // Either way the client reads the log until it meets the fan-out.
    reader.replaying = true;
    reader.sent = bounds.last;
    if let Some(last) = resume_from {
        let recovered = last >= bounds.pruned_through && last <= bounds.last;
        if recovered {
            reader.sent = last;
        }
        reader.ready.push_back(resume_event(last, recovered));
    }
    let events = futures::stream::unfold(reader, |mut reader| async move {
        let event = reader.next().await?;
        Some((Ok(event), reader))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `Last-Event-ID`, if sent: a non-negative integer, as this hub's ids are.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Last-Event-ID must be the id of an event of this stream (a non-negative integer)",
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text.is_empty() {
        // What a client that never saw an event may send: start live.
        return Ok(None);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse::<i64>().map(Some).map_err(|_| bad())
}

/// One client's position in the log.
struct Reader {
    store: Arc<dyn Store>,
    live: broadcast::Receiver<Arc<LoggedEvent>>,
    agent: Option<AgentId>,
    /// The newest id this client has been given (or skipped by its filter).
    sent: i64,
    /// Reading the log from `sent` instead of the live fan-out.
    replaying: bool,
    /// Events read and not yet sent.
    ready: VecDeque<Event>,
    shutdown: CancellationToken,
}

impl Reader {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if self.replaying {
                if let Err(err) = self.replay_page().await {
                    tracing::warn!(%err, "cannot read the event log for a client; closing its stream");
                    return None;
                }
                continue;
            }
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                next = self.live.recv() => next,
            };
            match next {
                Ok(event) => self.take(&event),
                // Catch up from the log, then go on live.
                Err(RecvError::Lagged(_)) => self.replaying = true,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Reads the next page of the log after `sent`; the last page ends the
    /// replay. Checks the horizon first: the log may have been pruned past
    /// this client while it lagged.
    async fn replay_page(&mut self) -> Result<(), StoreError> {
        let bounds = self.store.event_bounds().await?;
        if self.sent < bounds.pruned_through {
            let missed_after = self.sent;
            self.sent = bounds.last;
            self.ready.push_back(resume_event(missed_after, false));
            return Ok(());
        }
        let page = self
            .store
            .events_after(self.sent, MAX_EVENTS_PER_READ)
            .await?;
        if page.len() < MAX_EVENTS_PER_READ as usize {
            self.replaying = false;
        }
        for event in &page {
            self.take(event);
        }
        Ok(())
    }

    /// Queues `event` unless this client has it already or its filter
    /// leaves it out.
    fn take(&mut self, event: &LoggedEvent) {
        if event.id <= self.sent {
            return;
        }
        self.sent = event.id;
        if event.concerns(self.agent) {
            self.ready.push_back(
                Event::default()
                    .id(event.id.to_string())
                    .event(&event.kind)
                    .data(&event.data),
            );
        }
    }
}

/// Tells a client resuming after `last` whether it gets everything it
/// missed. It has no `id:`, so the client's own last id stays as it was.
fn resume_event(last: i64, recovered: bool) -> Event {
    Event::default()
        .event("resume")
        .data(json!({ "last_event_id": last, "recovered": recovered }).to_string())
}
