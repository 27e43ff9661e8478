//! A session's hold on its broker's affinity: which replica owns the
//! broker's live session, as storage records it.
//!
//! Invariant 2, kept here: affinity is a compare-and-swap, not a guess.
//! [`Affinity::claim`] records (replica, session) atomically, whoever held
//! it (newest wins). [`Affinity::heartbeat`] and [`Affinity::release`] name
//! the session and change nothing once a newer session has claimed it: a
//! superseded heartbeat answers [`AffinityError::Superseded`] (the caller
//! closes that stale socket), and a late release is a compare-and-clear that
//! matches nothing, so the teardown of an old socket never marks a newer
//! live session offline (a broker flapping between replicas).

use std::sync::Arc;

use switchyard_store::{
    BrokerId, ReplicaId, SessionHeartbeat, SessionId, Store, StoreError, Transport,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AffinityError {
    /// A newer session of the broker holds the affinity: this one must close.
    #[error("a newer session of this broker took over")]
    Superseded,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The affinity of one session of one broker on this replica.
#[derive(Clone, Debug)]
pub(crate) struct Affinity {
    store: Arc<dyn Store>,
    pub(crate) replica: ReplicaId,
    pub(crate) broker: BrokerId,
    pub(crate) session: SessionId,
    pub(crate) transport: Transport,
}

impl Affinity {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        replica: ReplicaId,
        broker: BrokerId,
        session: SessionId,
        transport: Transport,
    ) -> Self {
        Self {
            store,
            replica,
            broker,
            session,
            transport,
        }
    }

    /// Makes this session the broker's live one, whatever held it. Claim
    /// before the session's first drain: work inserted before the claim is
    /// found by that drain, work inserted after it reads this owner.
    ///
    /// Returns whether it took over from a session that still held the
    /// affinity (one that had not ended by itself).
    pub(crate) async fn claim(&self) -> Result<bool, AffinityError> {
        let previous = self
            .store
            .claim_affinity(self.broker, self.replica, self.session, self.transport)
            .await?;
        if let Some(previous) = &previous {
            tracing::debug!(broker = %self.broker, previous = ?previous, "took over affinity");
        }
        Ok(previous.is_some())
    }

    /// Records that the session is alive, if it is still the live one.
    pub(crate) async fn heartbeat(&self) -> Result<(), AffinityError> {
        match self
            .store
            .heartbeat_session(self.broker, self.session)
            .await?
        {
            SessionHeartbeat::Current => Ok(()),
            SessionHeartbeat::Superseded => Err(AffinityError::Superseded),
        }
    }

    /// A poll of this session arrived here: if the session is still the
    /// live one, this replica holds it from now on (see
    /// [`switchyard_store::AffinityStore::resume_session`]).
    pub(crate) async fn resume(&self) -> Result<(), AffinityError> {
        match self
            .store
            .resume_session(self.broker, self.replica, self.session)
            .await?
        {
            SessionHeartbeat::Current => Ok(()),
            SessionHeartbeat::Superseded => Err(AffinityError::Superseded),
        }
    }

    /// Clears the affinity if this session still holds it; true when it
    /// did (the broker is offline now).
    pub(crate) async fn release(&self) -> bool {
        match self
            .store
            .release_affinity(self.broker, self.replica, self.session)
            .await
        {
            Ok(true) => {
                tracing::info!(broker = %self.broker, session = %self.session, "broker disconnected");
                true
            }
            Ok(false) => {
                tracing::info!(
                    broker = %self.broker,
                    session = %self.session,
                    "superseded session closed; the newer session keeps the affinity"
                );
                false
            }
            Err(err) => {
                tracing::warn!(broker = %self.broker, %err, "could not release affinity");
                false
            }
        }
    }
}
