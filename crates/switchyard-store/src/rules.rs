//! The state words the statements test and write, rendered once from the
//! word types so no statement spells a state by hand.
//!
//! They are spliced into the SQL text as literals, not bound: PostgreSQL's
//! partial indexes (`WHERE state = 'pending'`, ...) are only used by a
//! statement whose text names the same literal.

use std::fmt;
use std::sync::LazyLock;

use switchyard_proto::Phase;

use crate::model::{BrokerStatus, IntentState, MessageState};

/// A word as an SQL string literal, e.g. `'pending'`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lit(pub(crate) &'static str);

impl fmt::Display for Lit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.0)
    }
}

/// Words as an SQL list, e.g. `('pending', 'dispatched')`.
#[derive(Clone, Debug)]
pub(crate) struct Any(Vec<&'static str>);

impl fmt::Display for Any {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, word) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            Lit(word).fmt(f)?;
        }
        f.write_str(")")
    }
}

/// The states of one kind of sequenced work (intents, messages): a row is
/// created `pending`, is `in_flight` while a replica holds its claim, and
/// ends in one of the `finished` states, which no call leaves again.
#[derive(Clone, Debug)]
pub(crate) struct WorkStates {
    pub(crate) pending: Lit,
    pub(crate) in_flight: Lit,
    /// `pending` or `in_flight`: the states an outcome, an ack, an expiry or
    /// a requeue may move a row out of.
    pub(crate) unfinished: Any,
    pub(crate) finished: Any,
    /// The final state of a row that ran out of time or attempts.
    pub(crate) failed: Lit,
}

pub(crate) static INTENT: LazyLock<WorkStates> = LazyLock::new(|| WorkStates {
    pending: Lit(IntentState::Pending.as_str()),
    in_flight: Lit(IntentState::InProgress.as_str()),
    unfinished: Any(vec![
        IntentState::Pending.as_str(),
        IntentState::InProgress.as_str(),
    ]),
    finished: Any(vec![
        IntentState::Done.as_str(),
        IntentState::Failed.as_str(),
    ]),
    failed: Lit(IntentState::Failed.as_str()),
});

pub(crate) static MESSAGE: LazyLock<WorkStates> = LazyLock::new(|| WorkStates {
    pending: Lit(MessageState::Pending.as_str()),
    in_flight: Lit(MessageState::Dispatched.as_str()),
    unfinished: Any(vec![
        MessageState::Pending.as_str(),
        MessageState::Dispatched.as_str(),
    ]),
    finished: Any(vec![
        MessageState::Delivered.as_str(),
        MessageState::Expired.as_str(),
        MessageState::Failed.as_str(),
    ]),
    failed: Lit(MessageState::Failed.as_str()),
});

/// The final state of an acked message.
pub(crate) static DELIVERED: LazyLock<Lit> =
    LazyLock::new(|| Lit(MessageState::Delivered.as_str()));
/// The final state of a message whose TTL passed.
pub(crate) static EXPIRED: LazyLock<Lit> = LazyLock::new(|| Lit(MessageState::Expired.as_str()));
/// A deleted agent keeps its row but gives up its name, takes no new work
/// and ignores status reports.
pub(crate) static DELETED: LazyLock<Lit> = LazyLock::new(|| Lit(Phase::Deleted.as_str()));
pub(crate) static ONLINE: LazyLock<Lit> = LazyLock::new(|| Lit(BrokerStatus::Online.as_str()));
pub(crate) static OFFLINE: LazyLock<Lit> = LazyLock::new(|| Lit(BrokerStatus::Offline.as_str()));
