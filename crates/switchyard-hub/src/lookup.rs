//! Resolving the `{broker}` / `{agent}` references users write: a UUID or
//! a name.

use switchyard_store::{Agent, AgentId, Broker, BrokerId, Store, StoreResult};

pub(crate) async fn broker(store: &dyn Store, reference: &str) -> StoreResult<Broker> {
    match reference.parse::<BrokerId>() {
        Ok(id) => store.broker(id).await,
        Err(_) => store.broker_by_name(reference).await,
    }
}

pub(crate) async fn agent(store: &dyn Store, reference: &str) -> StoreResult<Agent> {
    match reference.parse::<AgentId>() {
        Ok(id) => store.agent(id).await,
        Err(_) => store.agent_by_name(reference).await,
    }
}
