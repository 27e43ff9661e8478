//! `/v1/brokers`: registering brokers and showing their affinity.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard_store::{Broker, BrokerId};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::random_secret;
use super::request::Path;
use super::{ApiJson, validate_name};
use crate::lookup;
use crate::state::HubState;

/// The body of `POST /v1/brokers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewBroker {
    /// 1-64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`, not a UUID.
    #[schema(example = "edge-2")]
    name: String,
}

/// A broker just registered, with its secret: shown this once, stored
/// only as the handshake key derived from it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BrokerCreated {
    #[serde(flatten)]
    broker: Broker,
    secret: String,
}

/// Registers a broker; the secret is returned once and stored only as the
/// handshake key derived from it.
#[utoipa::path(
    post, path = "/v1/brokers", operation_id = "create_broker", tag = "brokers",
    request_body = NewBroker,
    responses(
        (status = 201, description = "Registered; the secret is shown once", body = BrokerCreated),
        (status = 400, description = "`bad_request`: malformed JSON", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`conflict`: a broker has that name", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 422, description = "`invalid`: a bad name, an unknown field", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<HubState>,
    ApiJson(body): ApiJson<NewBroker>,
) -> Result<(StatusCode, Json<BrokerCreated>), ApiError> {
    validate_name("broker", &body.name)?;
    let secret = random_secret();
    let key = switchyard_proto::auth::secret_key(&secret);
    let broker = state
        .store
        .create_broker(BrokerId::new(), &body.name, &key)
        .await?;
    Ok((StatusCode::CREATED, Json(BrokerCreated { broker, secret })))
}

#[utoipa::path(
    get, path = "/v1/brokers", operation_id = "list_brokers", tag = "brokers",
    responses(
        (status = 200, description = "Every registered broker", body = Vec<Broker>),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn list(State(state): State<HubState>) -> Result<Json<Vec<Broker>>, ApiError> {
    Ok(Json(state.store.list_brokers().await?))
}

#[utoipa::path(
    get, path = "/v1/brokers/{broker}", operation_id = "show_broker", tag = "brokers",
    params(("broker" = String, Path, description = "The broker's id or name", example = "edge")),
    responses(
        (status = 200, description = "The broker", body = Broker),
        (status = 400, description = "`bad_request`: a path that does not parse", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<Json<Broker>, ApiError> {
    Ok(Json(lookup::broker(&*state.store, &reference).await?))
}

#[utoipa::path(
    delete, path = "/v1/brokers/{broker}", operation_id = "delete_broker", tag = "brokers",
    params(("broker" = String, Path, description = "The broker's id or name", example = "edge")),
    responses(
        (status = 204, description = "Deregistered"),
        (status = 400, description = "`bad_request`: a path that does not parse", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`: the broker is connected or has agents that are not deleted", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn remove(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    let broker = lookup::broker(&*state.store, &reference).await?;
    state.store.delete_broker(broker.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
