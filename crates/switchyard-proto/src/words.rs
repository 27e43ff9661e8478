//! Closed sets of words shared by the wire, the database and the API.

/// Defines an enum of words stored and sent as text, with `as_str`,
/// `Display`, `FromStr` and `TryFrom<String>` (for row decoders).
#[macro_export]
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
        )]
        // Every word is its variant in snake_case; said here as well as on
        // each variant, because the schema derive cannot read a rename
        // whose text comes from this macro's arguments.
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word stored in the database and sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::UnknownWord;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::UnknownWord::new(stringify!($name), other)),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::UnknownWord;
            fn try_from(s: String) -> Result<Self, $crate::UnknownWord> {
                s.parse()
            }
        }
    };
}

/// A word this version does not know (sent or stored by a newer peer).
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} {word:?}")]
pub struct UnknownWord {
    kind: &'static str,
    word: String,
}

impl UnknownWord {
    pub fn new(kind: &'static str, word: &str) -> Self {
        Self {
            kind,
            word: word.to_owned(),
        }
    }
}

text_enum!(
    /// Lifecycle phase of an agent.
    Phase {
        Created => "created",
        Starting => "starting",
        Running => "running",
        Stopping => "stopping",
        Stopped => "stopped",
        Error => "error",
        Deleted => "deleted",
    }
);

impl Op {
    /// Whether the op moves the agent through phases (every op but
    /// [`Op::Call`]).
    pub fn is_lifecycle(self) -> bool {
        self != Op::Call
    }
}

impl Phase {
    /// Phases in which nothing is in motion: a lifecycle call waits for one.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Phase::Created | Phase::Running | Phase::Stopped | Phase::Error | Phase::Deleted
        )
    }
}

text_enum!(
    /// What a dispatch asks the broker to do with an agent.
    Op {
        /// Prepare the agent's directory; does not start it.
        Create => "create",
        Start => "start",
        Stop => "stop",
        Restart => "restart",
        /// Stop the agent and remove it from the broker.
        Delete => "delete",
        /// Run the named operation (`Dispatch::name`) with its `args` and
        /// answer with its result; the agent's phase does not change.
        Call => "call",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The words a schema of the API lists are the words on the wire.
    fn schema_words<T: utoipa::PartialSchema>() -> serde_json::Value {
        serde_json::to_value(T::schema()).unwrap_or_default()["enum"].clone()
    }

    #[test]
    fn the_schema_of_each_word_set_lists_its_wire_words() {
        let wire = |words: Vec<&str>| serde_json::json!(words);
        assert_eq!(
            schema_words::<Phase>(),
            wire(Phase::ALL.iter().map(|p| p.as_str()).collect())
        );
        assert_eq!(
            schema_words::<Op>(),
            wire(Op::ALL.iter().map(|o| o.as_str()).collect())
        );
    }
}
