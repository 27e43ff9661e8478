//! `/v1/brokers`: registering brokers and showing their affinity.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_store::{Broker, BrokerId};

use super::error::ApiError;
use super::random_secret;
use super::request::Path;
use super::{ApiJson, validate_name};
use crate::lookup;
use crate::state::HubState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewBroker {
    name: String,
}

/// Registers a broker; the secret is returned once and stored only as the
/// handshake key derived from it.
pub(crate) async fn create(
    State(state): State<HubState>,
    ApiJson(body): ApiJson<NewBroker>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    validate_name("broker", &body.name)?;
    let secret = random_secret();
    let key = switchyard_proto::auth::secret_key(&secret);
    let broker = state
        .store
        .create_broker(BrokerId::new(), &body.name, &key)
        .await?;
    let mut out = json!(broker);
    out["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

pub(crate) async fn list(State(state): State<HubState>) -> Result<Json<Vec<Broker>>, ApiError> {
    Ok(Json(state.store.list_brokers().await?))
}

pub(crate) async fn show(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<Json<Broker>, ApiError> {
    Ok(Json(lookup::broker(&*state.store, &reference).await?))
}

pub(crate) async fn remove(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    let broker = lookup::broker(&*state.store, &reference).await?;
    state.store.delete_broker(broker.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
