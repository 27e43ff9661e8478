//! Errors of the storage layer.

use crate::model::UnknownWord;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named row does not exist (or is not visible to the caller, such as
    /// another broker's agent).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The change would break a uniqueness or state rule; nothing changed.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The input is not acceptable; nothing changed.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A stored word this version does not know (a newer hub wrote it).
    #[error(transparent)]
    UnknownWord(#[from] UnknownWord),
    /// The database could not be reached or failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    /// True when the database itself is unreachable (worth retrying later),
    /// as opposed to a refusal of this particular request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
            )
        )
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    return StoreError::Conflict(db.message().to_owned());
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    return StoreError::Invalid(format!(
                        "refers to a row that does not exist: {}",
                        db.message()
                    ));
                }
                sqlx::error::ErrorKind::CheckViolation => {
                    return StoreError::Invalid(db.message().to_owned());
                }
                _ => {}
            }
        }
        StoreError::Database(err)
    }
}

/// Result of a storage call.
pub type StoreResult<T> = Result<T, StoreError>;
