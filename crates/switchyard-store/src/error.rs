//! Errors of the storage layer.
//!
//! Every case is a value, not a sentence: callers match on what went wrong
//! (which entity, which rule), and `Display` gives the operator the words.

use crate::model::UnknownWord;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named row does not exist.
    #[error("{0} not found")]
    NotFound(Entity),
    /// The row exists but belongs to another broker, which may neither see
    /// nor change it; nothing changed.
    #[error("{0} belongs to another broker")]
    NotOwned(Entity),
    /// The change would break a uniqueness or state rule; nothing changed.
    #[error("conflict: {0}")]
    Conflict(Conflict),
    /// The input is not acceptable; nothing changed.
    #[error("invalid input: {0}")]
    Invalid(Invalid),
    /// A stored word this version does not know (a newer hub wrote it).
    #[error(transparent)]
    UnknownWord(#[from] UnknownWord),
    /// The database could not be reached or failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

/// What kind of row a [`StoreError::NotFound`] or [`StoreError::NotOwned`]
/// is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entity {
    Broker,
    Agent,
    Intent,
    Message,
}

impl Entity {
    /// The word operators and brokers see (a dispatch intent is a
    /// "dispatch" to them).
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Broker => "broker",
            Entity::Agent => "agent",
            Entity::Intent => "dispatch",
            Entity::Message => "message",
        }
    }
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule a [`StoreError::Conflict`] is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("a broker named {0:?} exists already")]
    BrokerName(String),
    #[error("an agent named {0:?} exists already")]
    AgentName(String),
    #[error("broker is connected; stop its daemon first")]
    BrokerConnected,
    #[error("broker still has {0} agent(s); delete them first")]
    BrokerHasAgents(i64),
    /// A batch item's id is taken by a row its idempotency key did not name.
    #[error("id {0} exists already")]
    IdTaken(uuid::Uuid),
    /// Another uniqueness constraint, in the database's words.
    #[error("{0}")]
    Unique(String),
}

/// Which rule a [`StoreError::Invalid`] is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("command must not be empty")]
    EmptyCommand,
    #[error("empty batch")]
    EmptyBatch,
    #[error("empty insert")]
    EmptyInsert,
    #[error("empty idempotency key")]
    EmptyKey,
    #[error("idempotency key {0:?} appears twice in one batch")]
    RepeatedKey(String),
    /// A foreign key names a row that does not exist, in the database's words.
    #[error("refers to a row that does not exist: {0}")]
    MissingReference(String),
    /// A check constraint failed, in the database's words.
    #[error("{0}")]
    Check(String),
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
            let message = db.message().to_owned();
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    return StoreError::Conflict(Conflict::Unique(message));
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    return StoreError::Invalid(Invalid::MissingReference(message));
                }
                sqlx::error::ErrorKind::CheckViolation => {
                    return StoreError::Invalid(Invalid::Check(message));
                }
                _ => {}
            }
        }
        StoreError::Database(err)
    }
}

/// Result of a storage call.
pub type StoreResult<T> = Result<T, StoreError>;
