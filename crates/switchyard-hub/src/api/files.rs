//! `POST /v1/agents/{agent}/messages` as `multipart/form-data`: a message
//! with files.
//!
//! Parts: `message`, the JSON object a plain send takes (`body`, and
//! optionally `ttl_secs`, `deliver_after`); then one `file` part per file,
//! its name from the part's `filename`. Each file is staged in a temporary
//! file on this replica while it arrives (counted against the limits and
//! hashed on the way), then the message and every file are written in one
//! transaction: all of them or none, and nothing is written before the
//! whole request has been read and checked.

use axum::Json;
use axum::extract::Multipart;
use axum::extract::multipart::{Field, MultipartError};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;
use switchyard_proto::{AgentMessage, AttachmentRef, HubFrame, MAX_FRAME_BYTES, encode, file_name};
use switchyard_store::{AgentId, AttachmentId, NewAttachment};

use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::error::ApiError;
use super::idempotency_key;
use super::messages::{MessageAccepted, SendMessage, StoredFile, When, answer};
use super::request::{MAX_BODY_BYTES, refuse_in_json};
use crate::idempotency::Entry;
use crate::lookup;
use crate::state::HubState;

/// Messages with files received at once by one replica; one more answers
/// 503, so the client tries again (or another replica).
pub(crate) const MAX_UPLOADS: usize = 16;

/// How long receiving one message with its files may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A file received and staged, not stored yet.
struct Staged {
    name: String,
    size: u64,
    sha256: String,
    file: tokio::fs::File,
}

pub(crate) async fn send(
    state: HubState,
    reference: String,
    headers: HeaderMap,
    multipart: Multipart,
) -> Result<(StatusCode, Json<MessageAccepted>), ApiError> {
    let _permit = state
        .upload_permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            unavailable(format!(
                "this replica is receiving {MAX_UPLOADS} messages with files already; try again"
            ))
        })?;
    let key = idempotency_key(&headers)?;
    let (message, files) = tokio::time::timeout(UPLOAD_TIMEOUT, receive(&state, multipart))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the form was not received within {} s",
                    UPLOAD_TIMEOUT.as_secs()
                ),
            )
        })??;
    store(state, reference, key, message, files).await
}

/// Reads the form: its message part and its files, staged.
async fn receive(
    state: &HubState,
    mut multipart: Multipart,
) -> Result<(SendMessage, Vec<Staged>), ApiError> {
    let limit = state.config.max_attachment_bytes;
    let mut message: Option<SendMessage> = None;
    let mut files: Vec<Staged> = Vec::new();
    let mut total: u64 = 0;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("message") if message.is_none() => {
                let text = small_part(field).await?;
                let document: Value = serde_json::from_slice(&text)
                    .map_err(|e| ApiError::bad_request(format!("the message part: {e}")))?;
                refuse_in_json(&document)?;
                message = Some(serde_json::from_value(document).map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid",
                        format!("the message part: {e}"),
                    )
                })?);
            }
            Some("file") => {
                if files.len() >= state.config.max_attachments {
                    return Err(too_large(format!(
                        "at most {} files per message",
                        state.config.max_attachments
                    )));
                }
                files.push(stage(field, &mut total, limit).await?);
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part {other:?}: expected one message part and file parts"
                )));
            }
            None => return Err(ApiError::bad_request("a part without a name")),
        }
    }
    let message = message.ok_or_else(|| {
        ApiError::bad_request("no message part: send the message as a part named message")
    })?;
    Ok((message, files))
}

/// Checks the message with its files and writes them in one transaction.
async fn store(
    state: HubState,
    reference: String,
    key: Option<String>,
    message: SendMessage,
    files: Vec<Staged>,
) -> Result<(StatusCode, Json<MessageAccepted>), ApiError> {
    let refs: Vec<AttachmentRef> = files
        .iter()
        .map(|f| AttachmentRef {
            id: uuid::Uuid::max(),
            name: f.name.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
        })
        .collect();
    fits_with_files(&message.body, &refs)?;
    let when = When::new(message.ttl_secs, message.deliver_after);
    let lifetime = when.lifetime(&state, "the message")?;
    let agent_id = match reference.parse::<AgentId>() {
        Ok(id) => id,
        Err(_) => lookup::agent(&*state.store, &reference).await?.id,
    };
    let digested = json!({ "message": when.digested(&message.body), "files": refs
        .iter()
        .map(|r| json!({ "name": r.name, "size": r.size, "sha256": r.sha256 }))
        .collect::<Vec<_>>() });
    let entry = key.map(|key| Entry::message(agent_id, &key, &digested));
    let new = state
        .originator
        .message(agent_id, message.body, entry, lifetime);
    let mut attachments = Vec::with_capacity(files.len());
    let mut answered = Vec::with_capacity(files.len());
    for mut staged in files {
        staged
            .file
            .rewind()
            .await
            .map_err(|e| unavailable(format!("cannot read a staged file: {e}")))?;
        let id = AttachmentId::new();
        answered.push(StoredFile {
            id,
            name: staged.name.clone(),
            size: staged.size,
            sha256: staged.sha256.clone(),
        });
        attachments.push(NewAttachment {
            id,
            name: staged.name,
            size: staged.size,
            sha256: staged.sha256,
            content: Box::new(staged.file),
        });
    }
    let sent = state.originator.send_with_files(new, attachments).await?;
    let files = if sent.route.is_some() {
        answered
    } else {
        // A repeated key: the files the first request stored (none once
        // its message is final).
        let stored = state.store.attachments_of(&[sent.row.id]).await?;
        stored
            .into_iter()
            .map(|f| StoredFile {
                id: f.id,
                name: f.name,
                size: u64::try_from(f.size).unwrap_or_default(),
                sha256: f.sha256,
            })
            .collect()
    };
    Ok((StatusCode::ACCEPTED, Json(answer(&sent).with_files(files))))
}

/// A part read whole, which must be small (the message part).
async fn small_part(mut field: Field<'_>) -> Result<Vec<u8>, ApiError> {
    let mut data = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if data.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large(format!(
                "the message part is larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Writes a file part to a temporary file (deleted when dropped),
/// counting it against `limit` for the whole message and hashing it.
async fn stage(mut field: Field<'_>, total: &mut u64, limit: u64) -> Result<Staged, ApiError> {
    let name = file_name(field.file_name().unwrap_or(""));
    let temp =
        tempfile::tempfile().map_err(|e| unavailable(format!("cannot stage a file: {e}")))?;
    let mut file = tokio::fs::File::from_std(temp);
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        size += chunk.len() as u64;
        *total += chunk.len() as u64;
        if *total > limit {
            return Err(too_large(format!(
                "the files of one message may add up to {limit} bytes"
            )));
        }
        hash.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| unavailable(format!("cannot stage a file: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| unavailable(format!("cannot stage a file: {e}")))?;
    Ok(Staged {
        name,
        size,
        sha256: hex::encode(hash.finalize()),
        file,
    })
}

/// 413 unless the message frame, with its files named, fits in one frame
/// (the file names take room next to the body).
fn fits_with_files(body: &Value, refs: &[AttachmentRef]) -> Result<(), ApiError> {
    let frame = HubFrame::Message(AgentMessage {
        id: uuid::Uuid::max(),
        agent_id: uuid::Uuid::max(),
        seq: i64::MAX,
        body: body.clone(),
        attachments: refs.to_vec(),
    });
    let len = encode(&frame).len();
    if len > MAX_FRAME_BYTES {
        return Err(too_large(format!(
            "the message body and its file names are {len} bytes as a frame; at most {MAX_FRAME_BYTES} fit"
        )));
    }
    Ok(())
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
}

fn multipart_error(err: MultipartError) -> ApiError {
    let status = err.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(err.body_text());
    }
    ApiError::new(status, "bad_request", err.body_text())
}
