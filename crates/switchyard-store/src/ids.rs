//! Typed identifiers. Every id is a UUID on the wire and in storage; the
//! newtypes exist so that a call like `release_affinity(broker, replica,
//! session)` cannot silently swap two arguments.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
            utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// A hub: every replica sharing one database is the same hub.
    HubId
);
id_type!(
    /// A hub replica (`instance_id`).
    ReplicaId
);
id_type!(
    /// A registered broker.
    BrokerId
);
id_type!(
    /// One control-channel connection of a broker; a reconnect is a new session.
    SessionId
);
id_type!(
    /// An agent defined on a broker.
    AgentId
);
id_type!(
    /// A dispatch intent.
    IntentId
);
id_type!(
    /// A message to an agent.
    MessageId
);
id_type!(
    /// One message to many agents (each agent's copy is a message).
    BroadcastId
);
id_type!(
    /// A file sent with a message.
    AttachmentId
);
