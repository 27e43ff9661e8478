//! Errors of the storage layer.
//!
//! Every case is a value, not a sentence: callers match on what went wrong
//! (which entity, which rule), and `Display` gives the operator the words.

use crate::model::{Phase, UnknownWord};

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
    Attachment,
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
            Entity::Attachment => "attachment",
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
    /// The agent's phase does not allow the operation; nothing was written.
    #[error("the agent is {0}")]
    Phase(Phase),
    /// An idempotency key that created a row for another request; nothing
    /// was written.
    #[error("idempotency key {0:?} was used for a different request")]
    KeyReused(String),
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
    /// A broadcast's target matches more than
    /// [`crate::MAX_BROADCAST_AGENTS`] agents; nothing was written.
    #[error("the target matches more than {} agents", crate::MAX_BROADCAST_AGENTS)]
    TooManyAgents,
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
    /// A file sent with a message could not be stored as given.
    #[error("{0}")]
    Attachment(String),
}

impl StoreError {
    /// True when the database itself is unreachable (worth retrying later),
    /// as opposed to a refusal of this particular request: the connection
    /// could not be made or was lost, on the wire ([`sqlx::Error::Io`], TLS,
    /// protocol), in the pool, or as PostgreSQL reports it
    /// ([`is_unavailable_sqlstate`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_),
            ) => true,
            StoreError::Database(sqlx::Error::Database(db)) => db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| is_unavailable_sqlstate(pg.code())),
            _ => false,
        }
    }
}

/// PostgreSQL's words for "the connection is gone or refused", as opposed
/// to "this statement is wrong": class 08 (connection exception), 57P01
/// (admin shutdown, e.g. `pg_terminate_backend`), 57P02 (crash shutdown),
/// 57P03 (cannot connect now, e.g. starting up) and 53300 (too many
/// connections). Only PostgreSQL codes: SQLite's are numbers of another
/// scheme.
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
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

#[cfg(test)]
mod tests {
    use super::is_unavailable_sqlstate;

    #[test]
    fn lost_and_refused_connections_are_unavailable_other_codes_are_not() {
        for code in ["08000", "08003", "08006", "08001", "08004", "08P01"] {
            assert!(is_unavailable_sqlstate(code), "{code}");
        }
        for code in ["57P01", "57P02", "57P03", "53300"] {
            assert!(is_unavailable_sqlstate(code), "{code}");
        }
        // Refusals of the statement itself: the request is at fault.
        for code in [
            "22021", "23505", "23503", "42P01", "57014", "40001", "53200",
        ] {
            assert!(!is_unavailable_sqlstate(code), "{code}");
        }
    }
}
