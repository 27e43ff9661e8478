//! Files sent with messages: written with their message in one
//! transaction, read back in chunks, deleted once their message is final.

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use crate::batch::replay;
use crate::dialect::{BindNow, for_each_backend, sql};
use crate::error::{Entity, Invalid, StoreError, StoreResult};
use crate::ids::{AttachmentId, BrokerId, MessageId, ReplicaId};
use crate::model::{Attachment, Inserted, Message, NewAttachment, NewMessage};
use crate::rules::{DELETED, MESSAGE};

/// Bytes per stored chunk: what either side holds of one file at a time.
pub const ATTACHMENT_CHUNK: usize = 1 << 20;

/// Keeps the files sent with messages.
#[async_trait]
pub trait AttachmentStore: Send + Sync {
    /// Writes a message and its files (read from each `content` now) in one
    /// transaction: all of them or none. The message goes to the end of its
    /// agent's FIFO; an idempotency key already used answers with the
    /// message it wrote (its files are not read), or `KeyReused` for
    /// another digest. `NotFound` if the agent is unknown or deleted; a
    /// file whose content is not `size` bytes is `Invalid`.
    async fn insert_message_with_attachments(
        &self,
        message: NewMessage,
        attachments: Vec<NewAttachment>,
    ) -> StoreResult<Inserted<Message>>;

    /// The files of these messages, in each message's order.
    async fn attachments_of(&self, messages: &[MessageId]) -> StoreResult<Vec<Attachment>>;

    /// A file, if it is `broker`'s: `NotFound` for another broker's file
    /// or one that is gone (its message is final).
    async fn attachment(&self, broker: BrokerId, id: AttachmentId) -> StoreResult<Attachment>;

    /// Chunk `n` (from 0) of a file; `None` past the last one.
    async fn attachment_chunk(&self, id: AttachmentId, n: i32) -> StoreResult<Option<Vec<u8>>>;

    /// Deletes the files of messages that are final (delivered, expired,
    /// failed, cancelled): delivered ones have been fetched, the others
    /// never will be. Returns how many files went.
    async fn remove_finished_attachments(&self) -> StoreResult<u64>;

    /// Bytes of files stored.
    async fn attachment_bytes(&self) -> StoreResult<i64>;
}

for_each_backend! {
    #[async_trait]
    impl AttachmentStore for Backend {
        async fn insert_message_with_attachments(
            &self,
            m: NewMessage,
            attachments: Vec<NewAttachment>,
        ) -> StoreResult<Inserted<Message>> {
            let mut tx = self.write().await?;
            if let Some(key) = m.idempotency_key.as_deref() {
                let existing: Option<Message> = sqlx::query_as(sql!(
                    "SELECT * FROM messages WHERE idempotency_key = $1"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(existing) = existing {
                    return replay(&m, existing);
                }
            }
            let target: Option<(BrokerId, i64, i64)> = sqlx::query_as(sql!(
                "UPDATE agents SET message_seq = message_seq + 1, work_seq = work_seq + 1
                 WHERE id = $1 AND phase <> {deleted}
                 RETURNING broker_id, message_seq, work_seq",
                deleted = *DELETED
            ))
            .bind(m.agent_id)
            .fetch_optional(&mut *tx)
            .await?;
            let (broker, seq, ord) = target.ok_or(StoreError::NotFound(Entity::Agent))?;
            // The owner, read under the lock `claim_affinity` waits for
            // (see `Inserted::owner`).
            let owner: Option<ReplicaId> = sqlx::query_scalar(sql!(
                "SELECT connected_replica FROM brokers WHERE id = $1 @for_key_share"
            ))
            .bind(broker)
            .fetch_one(&mut *tx)
            .await?;
            let count = i32::try_from(attachments.len())
                .map_err(|_| StoreError::Invalid(Invalid::Attachment("too many files".into())))?;
            let inserted: Result<Message, sqlx::Error> = sqlx::query_as(sql!(
                "INSERT INTO messages
                     (id, agent_id, broker_id, seq, ord, body, expires_at, deliver_after,
                      idempotency_key, request_digest, attachments, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, @now, @now) RETURNING *"
            ))
            .bind(m.id)
            .bind(m.agent_id)
            .bind(broker)
            .bind(seq)
            .bind(ord)
            .bind(sqlx::types::Json(&m.body))
            .bind(m.expires_at)
            .bind(m.deliver_after)
            .bind(m.idempotency_key.as_deref())
            .bind(m.request_digest.as_deref())
            .bind(count)
            .bind_now()
            .fetch_one(&mut *tx)
            .await;
            let row = match inserted {
                Ok(row) => row,
                // A concurrent request with the same key committed first
                // (its agent lock made this one wait): answer with its row,
                // as a later repeat would be.
                Err(sqlx::Error::Database(db))
                    if db.kind() == sqlx::error::ErrorKind::UniqueViolation
                        && m.idempotency_key.is_some() =>
                {
                    drop(tx);
                    let existing: Message = sqlx::query_as(sql!(
                        "SELECT * FROM messages WHERE idempotency_key = $1"
                    ))
                    .bind(m.idempotency_key.as_deref())
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or(StoreError::NotFound(Entity::Message))?;
                    return replay(&m, existing);
                }
                Err(err) => return Err(err.into()),
            };
            let mut buf = vec![0; ATTACHMENT_CHUNK];
            for (position, mut file) in attachments.into_iter().enumerate() {
                let size = i64::try_from(file.size).map_err(|_| {
                    StoreError::Invalid(Invalid::Attachment("file too large".into()))
                })?;
                sqlx::query(sql!(
                    "INSERT INTO attachments
                         (id, message_id, broker_id, position, name, size, sha256, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, @now)"
                ))
                .bind(file.id)
                .bind(m.id)
                .bind(broker)
                .bind(i32::try_from(position).unwrap_or(i32::MAX))
                .bind(&file.name)
                .bind(size)
                .bind(&file.sha256)
                .bind_now()
                .execute(&mut *tx)
                .await?;
                let mut read: u64 = 0;
                let mut n: i32 = 0;
                loop {
                    let filled = fill(&mut *file.content, &mut buf).await.map_err(|e| {
                        StoreError::Invalid(Invalid::Attachment(format!("cannot read a file: {e}")))
                    })?;
                    if filled == 0 {
                        break;
                    }
                    read += filled as u64;
                    sqlx::query(sql!(
                        "INSERT INTO attachment_chunks (attachment_id, n, data) VALUES ($1, $2, $3)"
                    ))
                    .bind(file.id)
                    .bind(n)
                    .bind(&buf[..filled])
                    .execute(&mut *tx)
                    .await?;
                    n += 1;
                }
                if read != file.size {
                    return Err(StoreError::Invalid(Invalid::Attachment(format!(
                        "{} is {read} bytes, not the {} announced",
                        file.name, file.size
                    ))));
                }
            }
            tx.commit().await?;
            Ok(Inserted { row, created: true, owner })
        }

        async fn attachments_of(&self, messages: &[MessageId]) -> StoreResult<Vec<Attachment>> {
            let mut all = Vec::new();
            for &id in messages {
                let rows: Vec<Attachment> = sqlx::query_as(sql!(
                    "SELECT * FROM attachments WHERE message_id = $1 ORDER BY position"
                ))
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
                all.extend(rows);
            }
            Ok(all)
        }

        async fn attachment(&self, broker: BrokerId, id: AttachmentId) -> StoreResult<Attachment> {
            // A final message's files are gone, whether or not the sweeper
            // has removed them yet.
            sqlx::query_as(sql!(
                "SELECT a.* FROM attachments a JOIN messages m ON m.id = a.message_id
                 WHERE a.id = $1 AND a.broker_id = $2 AND m.state IN {unfinished}",
                unfinished = MESSAGE.unfinished,
            ))
            .bind(id)
            .bind(broker)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound(Entity::Attachment))
        }

        async fn attachment_chunk(&self, id: AttachmentId, n: i32) -> StoreResult<Option<Vec<u8>>> {
            Ok(sqlx::query_scalar(sql!(
                "SELECT data FROM attachment_chunks WHERE attachment_id = $1 AND n = $2"
            ))
            .bind(id)
            .bind(n)
            .fetch_optional(&self.pool)
            .await?)
        }

        async fn remove_finished_attachments(&self) -> StoreResult<u64> {
            let done = sqlx::query(sql!(
                "DELETE FROM attachments WHERE message_id IN
                     (SELECT id FROM messages WHERE attachments > 0 AND state NOT IN {unfinished})",
                unfinished = MESSAGE.unfinished,
            ))
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected())
        }

        async fn attachment_bytes(&self) -> StoreResult<i64> {
            let bytes: Option<i64> = sqlx::query_scalar(sql!(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM attachments"
            ))
            .fetch_one(&self.pool)
            .await?;
            Ok(bytes.unwrap_or(0))
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn fill(
    content: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = content.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
