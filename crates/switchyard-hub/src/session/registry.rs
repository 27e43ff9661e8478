//! The control-channel sessions this replica holds, by broker.
//!
//! The map is a local index, not the truth: affinity in storage says which
//! session is live. A replica keeps at most one session per broker here;
//! a newer local session of the same broker replaces (and closes) the older.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use switchyard_store::{BrokerId, SessionId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::close::Close;
use super::writer::Outbox;

/// Handle on one live session of this replica.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) session_id: SessionId,
    pub(crate) outbox: Outbox,
    /// Wakes the session's drain: there is new work for the broker.
    pub(crate) wake: Arc<Notify>,
    /// Cancelled when the session ends, for whatever reason.
    pub(crate) cancel: CancellationToken,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_broker: Mutex<HashMap<BrokerId, SessionHandle>>,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, HashMap<BrokerId, SessionHandle>> {
        // The map holds no invariant a thread panicking with the lock could break halfway.
        self.by_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session, closing the older local session it replaces.
    pub(crate) fn insert(&self, broker: BrokerId, handle: SessionHandle) {
        let older = self.map().insert(broker, handle);
        if let Some(old) = older {
            old.outbox.close(Close::superseded());
        }
    }

    /// Forgets the session, if it is still the registered one.
    pub(crate) fn remove(&self, broker: BrokerId, session: SessionId) {
        let mut map = self.map();
        if map.get(&broker).is_some_and(|h| h.session_id == session) {
            map.remove(&broker);
        }
    }

    /// Wakes the drain of the broker's local session. False if there is none.
    pub(crate) fn wake(&self, broker: BrokerId) -> bool {
        match self.map().get(&broker) {
            Some(handle) => {
                handle.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes every local session's drain (after the listener reconnects).
    pub(crate) fn wake_all(&self) {
        for handle in self.map().values() {
            handle.wake.notify_one();
        }
    }
}
