//! The state words the statements test and write, rendered once from the
//! word types so no statement spells a state by hand.
//!
//! They are spliced into the SQL text as literals, not bound: PostgreSQL's
//! partial indexes (`WHERE state = 'pending'`, ...) are only used by a
//! statement whose text names the same literal.

use std::fmt;
use std::sync::LazyLock;

use switchyard_proto::Phase;

use crate::model::{BrokerStatus, IntentState, MessageState, Transport};

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
    /// The final state of a row withdrawn while it was `pending`.
    pub(crate) cancelled: Lit,
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
        IntentState::Cancelled.as_str(),
    ]),
    failed: Lit(IntentState::Failed.as_str()),
    cancelled: Lit(IntentState::Cancelled.as_str()),
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
        MessageState::Cancelled.as_str(),
    ]),
    failed: Lit(MessageState::Failed.as_str()),
    cancelled: Lit(MessageState::Cancelled.as_str()),
});

impl WorkStates {
    /// The `SET` clause of a requeue, the dead-letter rule written once: a
    /// claimed row goes back to `pending`, unless it has been claimed
    /// `max_param` times already; then it fails with `why` and the number of
    /// attempts as its error, keeping its last claim for the record, and
    /// its agent's queue moves on.
    pub(crate) fn requeue_set(&self, max_param: &str, why: &str) -> String {
        assert!(
            !why.contains('\''),
            "a reason is spliced into the SQL as a literal"
        );
        let (failed, pending) = (self.failed, self.pending);
        format!(
            "state = CASE WHEN attempts >= {max_param} THEN {failed} ELSE {pending} END,
             error = CASE WHEN attempts >= {max_param}
                          THEN '{why} (' || attempts || ' attempts)' ELSE error END,
             claimed_by = CASE WHEN attempts >= {max_param} THEN claimed_by END,
             claimed_at = CASE WHEN attempts >= {max_param} THEN claimed_at END"
        )
    }
}

impl WorkStates {
    /// The `SET` clause that puts a claimed row back to `pending` without
    /// counting its claim as an attempt (it was sent behind the row that
    /// ended the session, which the broker never got past).
    pub(crate) fn uncounted_requeue_set(&self) -> String {
        let pending = self.pending;
        format!(
            "state = {pending}, claimed_by = NULL, claimed_at = NULL,
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
        )
    }
}

/// Why the sweeper failed a row: its claims kept being abandoned.
pub(crate) const ABANDONED: &str = "abandoned by its claimer every time";
/// Why a new session failed a row: every session it was sent on ended
/// before the broker answered (a poison message or dispatch).
pub(crate) const SESSION_ENDED: &str = "the broker session ended every time it was sent";

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
/// The transport whose sessions lapse and whose claims are leased.
pub(crate) static POLL: LazyLock<Lit> = LazyLock::new(|| Lit(Transport::Poll.as_str()));
