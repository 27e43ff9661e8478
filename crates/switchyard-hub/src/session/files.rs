//! `GET /v1/brokers/attachments/{id}`: a broker fetches a file sent with a
//! message it was given, on either transport.
//!
//! Signed like every broker request (a fresh nonce each time). A broker
//! gets only its own agents' files: another broker's file, an unknown id
//! and a file already removed (its message is final) are all 404, so the
//! answer says nothing about other brokers. The body is streamed a stored
//! chunk at a time; `content-length` and `x-switchyard-sha256` let the
//! broker check what it got.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream;
use switchyard_store::{AttachmentId, StoreError};

use super::hello;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::request::Path;
use crate::state::HubState;

/// The header carrying the file's SHA-256 (lowercase hex).
pub(crate) const SHA256_HEADER: &str = "x-switchyard-sha256";

#[utoipa::path(
    get, path = "/v1/brokers/attachments/{id}", operation_id = "fetch_attachment", tag = "control channel",
    params(("id" = String, Path, description = "The file's id, from the message frame")),
    security(("broker_id" = [], "broker_timestamp" = [], "broker_nonce" = [], "broker_signature" = [])),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>,
         headers(("x-switchyard-sha256" = String, description = "Lowercase hex SHA-256 of the bytes"))),
        (status = 400, description = "`bad_request`: a path that does not parse", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a missing or malformed handshake header, a timestamp off by more than 300 s, wrong credentials, a replayed nonce", body = ErrorBody),
        (status = 404, description = "`not_found`: an unknown id, another broker's file, or one removed since (its message is final)", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn fetch(
    State(state): State<HubState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let broker = match hello::authenticate(&*state.store, &headers).await {
        Ok(broker) => broker,
        Err(err) => return ApiError::from(err).into_response(),
    };
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such file among this broker's",
        )
        .into_response()
    };
    let Ok(id) = id.parse::<AttachmentId>() else {
        return not_found();
    };
    let file = match state.store.attachment(broker.id, id).await {
        Ok(file) => file,
        Err(StoreError::NotFound(_)) => return not_found(),
        Err(err) => return ApiError::from(err).into_response(),
    };
    let store = state.store.clone();
    // One stored chunk per item; a chunk missing before the file's size is
    // reached (the file was removed meanwhile) ends the body early, which
    // the broker sees as a short read.
    let chunks = stream::unfold(Some(0), move |n| {
        let store = store.clone();
        async move {
            let n = n?;
            match store.attachment_chunk(id, n).await {
                Ok(Some(data)) => Some((Ok(axum::body::Bytes::from(data)), Some(n + 1))),
                Ok(None) => None,
                Err(err) => Some((Err(err), None)),
            }
        }
    });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.size.max(0)));
    if let Ok(sha) = HeaderValue::from_str(&file.sha256) {
        headers.insert(SHA256_HEADER, sha);
    }
    response
}
