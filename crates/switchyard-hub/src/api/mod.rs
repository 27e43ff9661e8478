//! The `/v1` HTTP API (see `docs/api.md`): one file per resource, and
//! [`request`], what every call passes before its handler (the admin token,
//! the path, query and JSON body with NUL bytes refused, the
//! `Idempotency-Key` header, names). Bodies are JSON with unknown fields
//! refused, and every error is `{"error": {"code", "message"}}`
//! ([`error::ApiError`]). Handlers parse, call the originator or the store,
//! and map the outcome to a response; the route table is `http_routes`.

pub(crate) mod agents;
pub(crate) mod brokers;
pub(crate) mod dispatches;
pub(crate) mod error;
pub(crate) mod events;
mod files;

pub(crate) use files::MAX_UPLOADS;
pub(crate) mod messages;
pub(crate) mod openapi;
pub(crate) mod ops;
pub(crate) mod queues;
pub(crate) mod request;

pub(crate) use request::{
    AdminTokens, ApiJson, MAX_BODY_BYTES, idempotency_key, require_admin, validate_labels,
    validate_name,
};
pub use request::{random_secret, token_digest};
