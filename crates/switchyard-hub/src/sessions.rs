//! The control-channel sessions held by this replica.
//!
//! The map is a local index, not the truth: affinity in storage says which
//! session is live. A replica keeps at most one session per broker here;
//! a newer local session of the same broker replaces (and closes) the older.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use switchyard_proto::HubFrame;
use switchyard_store::{BrokerId, SessionId};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// What the writer task of a socket sends.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(HubFrame),
    Ping,
    /// Send a close frame with this code and reason, then stop writing.
    Close(u16, &'static str),
}

/// Close codes the hub uses (RFC 6455 and the private 4000 range).
pub(crate) mod close_code {
    pub(crate) const GOING_AWAY: u16 = 1001;
    pub(crate) const PROTOCOL: u16 = 1002;
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    pub(crate) const POLICY: u16 = 1008;
    pub(crate) const TOO_BIG: u16 = 1009;
    pub(crate) const INTERNAL: u16 = 1011;
    pub(crate) const SUPERSEDED: u16 = 4000;
    pub(crate) const SILENT: u16 = 4001;
}

/// Handle on one live session of this replica.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) session_id: SessionId,
    pub(crate) outbound: mpsc::Sender<Outbound>,
    /// Wakes the session's drain loop: there is new work for the broker.
    pub(crate) wake: Arc<Notify>,
    /// Cancelled when the session ends, for whatever reason.
    pub(crate) cancel: CancellationToken,
}

impl SessionHandle {
    /// Tells the broker why, closes the socket, and ends the session.
    pub(crate) fn close(&self, frame: Option<HubFrame>, code: u16, reason: &'static str) {
        if let Some(frame) = frame {
            let _ = self.outbound.try_send(Outbound::Frame(frame));
        }
        let _ = self.outbound.try_send(Outbound::Close(code, reason));
        self.cancel.cancel();
    }
}

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_broker: Mutex<HashMap<BrokerId, SessionHandle>>,
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<BrokerId, SessionHandle>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.by_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session; returns the older local session it replaces.
    pub(crate) fn insert(&self, broker: BrokerId, handle: SessionHandle) -> Option<SessionHandle> {
        self.map().insert(broker, handle)
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
