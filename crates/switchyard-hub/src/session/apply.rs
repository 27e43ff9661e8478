//! What the hub does with each frame a broker sends, one function per kind.
//!
//! Each frame is applied in its own transaction and its event published
//! after the commit (invariant 6). A frame about another broker's agents,
//! dispatches or messages is refused with a `forbidden` error frame and
//! changes nothing (invariant 8); a storage failure ends the session (the
//! broker reconnects and resends) or, on the poll transport, fails the
//! request (the broker sends it again). The same frames arrive on both
//! transports and are applied here alike.

use switchyard_proto::{AgentStatus, BrokerFrame, DispatchResult, ErrorCode, HubFrame};
use switchyard_store::{
    AgentId, Broker, Entity, IntentId, IntentOutcome, MessageId, StatusReport, StoreError,
};

use super::close::error_frame;
use crate::events::HubEvent;
use crate::state::HubState;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The frame names a `{0}` that is not this broker's (or none at all).
    #[error("{0} not found among this broker's")]
    NotOwn(Entity),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ApplyError {
    fn from(err: StoreError) -> Self {
        match err {
            // The store scopes every lookup to the broker: another broker's
            // row and a missing one are both "not yours".
            StoreError::NotFound(what) | StoreError::NotOwned(what) => ApplyError::NotOwn(what),
            other => ApplyError::Store(other),
        }
    }
}

/// Applies one frame, on any transport. Only errors that must end the
/// session (or fail the request) come back as errors; a refusal comes back
/// as the error frame to answer with.
pub(crate) async fn apply(
    state: &HubState,
    broker: &Broker,
    frame: BrokerFrame,
) -> Result<Option<HubFrame>, ApplyError> {
    let applied = match frame {
        BrokerFrame::Status(report) => status(state, broker, report).await,
        BrokerFrame::Result(report) => result(state, broker, report).await,
        BrokerFrame::Ack {
            message_ids,
            received,
        } => ack(state, broker, message_ids, received).await,
        BrokerFrame::Error(error) => {
            tracing::warn!(broker = %broker.id, code = ?error.code, message = %error.message, "broker reported an error");
            Ok(())
        }
        // Only the first frame may be one. Answered, not fatal.
        BrokerFrame::Hello { .. } => {
            return Ok(Some(error_frame(
                ErrorCode::Protocol,
                "hello is only valid as the first frame",
            )));
        }
    };
    match applied {
        Ok(()) => Ok(None),
        Err(err @ ApplyError::NotOwn(_)) => {
            tracing::warn!(broker = %broker.id, %err, "broker reported on something that is not its own; refused");
            Ok(Some(error_frame(ErrorCode::Forbidden, err.to_string())))
        }
        Err(err) => Err(err),
    }
}

/// `status`: an agent's phase (with its exit code and detail), applied only
/// if newer than the last report.
pub(crate) async fn status(
    state: &HubState,
    broker: &Broker,
    report: AgentStatus,
) -> Result<(), ApplyError> {
    let (agent, applied) = state
        .store
        .apply_agent_status(
            broker.id,
            AgentId(report.agent_id),
            StatusReport::new(report.phase, report.seq, report.exit_code, report.detail),
        )
        .await?;
    if applied {
        state.bus.publish(HubEvent::AgentStatus(agent));
    }
    Ok(())
}

/// `result`: the outcome of a dispatch this broker was sent. Final states
/// are final: a late or repeated result changes nothing.
async fn result(
    state: &HubState,
    broker: &Broker,
    report: DispatchResult,
) -> Result<(), ApplyError> {
    let id = IntentId(report.dispatch_id);
    let intent = state.store.intent(id).await?;
    if intent.broker_id != broker.id {
        return Err(ApplyError::NotOwn(Entity::Intent));
    }
    let outcome = IntentOutcome::from_broker(report.ok, report.result, report.error, report.code);
    if state.store.finish_intent(id, outcome).await? {
        let finished = state.store.intent(id).await?;
        state.metrics.observe_finished(&finished);
        state.bus.publish(HubEvent::DispatchFinished(finished));
        // An operation is a barrier for the agent's later messages: now
        // that it is done, they can go. (Only then: a drain pass after
        // every result cost a quarter of the lifecycle throughput.)
        // (A broker call belongs to no agent and holds nothing back.)
        if let Some(agent) = intent.agent_id
            && state
                .store
                .has_pending_messages(agent)
                .await
                .unwrap_or(true)
        {
            // On the poll transport the waiting poll may be on another
            // replica than this report.
            state.originator.wake(broker.id).await;
        }
    }
    Ok(())
}

/// `ack`: messages the broker handed to their agents, in one statement
/// per frame, and work it received (which a poll then does not send
/// again). Every id is applied; one that is not this broker's is refused
/// after the others. Repeating an ack changes nothing.
async fn ack(
    state: &HubState,
    broker: &Broker,
    message_ids: Vec<uuid::Uuid>,
    received: Vec<uuid::Uuid>,
) -> Result<(), ApplyError> {
    let mut refused = None;
    if !received.is_empty() && !state.store.receive(broker.id, &received).await?.is_empty() {
        refused = Some(ApplyError::NotOwn(Entity::Intent));
    }
    if !message_ids.is_empty() {
        let ids: Vec<MessageId> = message_ids.into_iter().map(MessageId).collect();
        let acked = state.store.ack_messages(broker.id, &ids).await?;
        state.metrics.messages_delivered.inc_by(acked.delivered);
        for waited in &acked.waited {
            state.metrics.accept_to_ack.observe(waited.as_secs_f64());
        }
        for message in acked.messages {
            state.bus.publish(HubEvent::MessageDelivered(message));
        }
        if !acked.not_found.is_empty() {
            refused = Some(ApplyError::NotOwn(Entity::Message));
        }
    }
    refused.map_or(Ok(()), Err)
}
