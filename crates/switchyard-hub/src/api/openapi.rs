//! The API's machine-readable description: an OpenAPI 3.1 document built
//! from the handlers' `#[utoipa::path]` annotations and the `ToSchema`
//! derives of the types they read and answer with (this crate's, the
//! store's rows, the protocol's frames), so it changes with the code.
//! Served without a token at [`PATH`]; `tests/openapi.rs` validates it and
//! fuzzes a live hub against it.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::api::{agents, brokers, dispatches, events, messages, ops, queues};
use crate::{http_routes, session, ui};

/// Where the document is served.
pub(crate) const PATH: &str = "/v1/openapi.json";

/// The document. Every operation needs the admin token unless it says
/// otherwise: the operator endpoints and this document need nothing, the
/// control channel the broker's signed handshake.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Switchyard hub",
        description = "The HTTP API of a Switchyard hub replica; every replica answers every \
                       call. Errors are `{\"error\": {\"code\", \"message\"}}` (plus \
                       `dispatch_id` where a dispatch exists). docs/api.md describes the \
                       behaviour behind each call."
    ),
    security(("admin_token" = [])),
    modifiers(&SecuritySchemes),
    paths(
        brokers::create,
        brokers::list,
        brokers::show,
        brokers::remove,
        agents::create,
        agents::list,
        agents::show,
        agents::start,
        agents::stop,
        agents::restart,
        agents::remove,
        ops::call,
        ops::broker_call,
        messages::send,
        messages::send_batch,
        messages::show,
        messages::cancel,
        dispatches::list,
        dispatches::show,
        dispatches::cancel,
        dispatches::cluster,
        queues::show,
        events::stream,
        session::connect,
        session::poll::hello,
        session::poll::poll,
        session::poll::report,
        session::files::fetch,
        http_routes::healthz,
        http_routes::readyz,
        http_routes::metrics,
        ui::dashboard,
        document,
    ),
    tags(
        (name = "brokers", description = "Registering brokers"),
        (name = "agents", description = "Agent definitions and lifecycle calls"),
        (name = "operations", description = "Named operations of a broker's runtime"),
        (name = "messages", description = "Durable messages to agents"),
        (name = "dispatches", description = "Dispatch intents"),
        (name = "cluster", description = "Live replicas"),
        (name = "events", description = "Server-Sent Events"),
        (name = "control channel", description = "How brokers reach the hub (docs/protocol.md); \
                                                   signed with the broker's secret"),
        (name = "operator", description = "Health, readiness, metrics and this document; no token"),
    )
)]
pub(crate) struct ApiDoc;

/// The `Idempotency-Key` header of the writes that may be retried.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // describes the header; `super::idempotency_key` reads it
pub(crate) struct IdempotencyKey {
    /// 1-255 printable ASCII characters. The same key with the same
    /// request answers from the original; with another request, 422
    /// `idempotency_key_reused`.
    #[param(rename = "Idempotency-Key", pattern = "^[!-~]{1,255}$")]
    idempotency_key: Option<String>,
}

/// The two ways in: the admin token, and the broker's signed handshake
/// (four headers, all required together; see docs/protocol.md, section 1).
#[derive(Debug)]
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <admin token>`: the token `switchyard serve` \
                         printed or was given",
                    ))
                    .build(),
            ),
        );
        let headers = [
            (
                "broker_id",
                switchyard_proto::auth::HEADER_BROKER,
                "The broker's id or name, exactly as signed",
            ),
            (
                "broker_timestamp",
                switchyard_proto::auth::HEADER_TIMESTAMP,
                "Unix seconds at signing; at most 300 s from the hub's clock",
            ),
            (
                "broker_nonce",
                switchyard_proto::auth::HEADER_NONCE,
                "16-128 printable characters, never used before by this broker (a replay is \
                 refused on every replica)",
            ),
            (
                "broker_signature",
                switchyard_proto::auth::HEADER_SIGNATURE,
                "hex(HMAC-SHA256(SHA-256(secret), \"switchyard-connect-v1\\n{broker}\\n\
                 {timestamp}\\n{nonce}\")): the broker's signed handshake, fresh for every \
                 request",
            ),
        ];
        for (name, header, description) in headers {
            components.add_security_scheme(
                name,
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                    header,
                    description,
                ))),
            );
        }
    }
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", operation_id = "openapi_document", tag = "operator", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
