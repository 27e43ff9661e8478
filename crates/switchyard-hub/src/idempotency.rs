//! The idempotency ledger: what a repeated `Idempotency-Key` means.
//!
//! A key is scoped to the endpoint and the agent a call names: the same key
//! on another endpoint or for another agent is another entry, so a key
//! reused by mistake can never act on an agent the call did not name. The
//! row a call creates carries its entry: the scoped key (unique) and a
//! digest of what the call asked for (method, route, agent, operation,
//! body). A call whose key names an existing row is answered from that row
//! when the digests match, and refused with 422 `idempotency_key_reused`,
//! nothing written, when they do not (the store keeps that rule). Entries
//! live as long as their rows: the sweeper's retention window.

use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard_store::{AgentId, BrokerId, Op};

/// A call's entry in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The scope and the caller's key, as stored (unique).
    pub(crate) key: String,
    /// SHA-256 (hex) of the scope, the operation and the body.
    pub(crate) digest: String,
}

impl Entry {
    fn new(scope: String, op: &str, key: &str, body: &Value) -> Self {
        // serde_json writes object keys in sorted order, so two bodies
        // that differ only in key order have one digest.
        let digest = hex::encode(Sha256::digest(format!("{scope}\n{op}\n{body}")));
        Self {
            key: format!("{scope} {key}"),
            digest,
        }
    }

    /// `POST /v1/agents/{agent}/messages`.
    pub(crate) fn message(agent: AgentId, key: &str, body: &Value) -> Self {
        Self::new(
            format!("POST /v1/agents/{agent}/messages"),
            "message",
            key,
            body,
        )
    }

    /// One item of `POST /v1/messages`: its own key, or the call's key
    /// with `/i` appended.
    pub(crate) fn batch_item(agent: AgentId, key: &str, body: &Value) -> Self {
        Self::new(format!("POST /v1/messages {agent}"), "message", key, body)
    }

    /// A broadcast of `POST /v1/messages`: one entry for the whole call,
    /// its digest over the target and the body.
    pub(crate) fn broadcast(key: &str, target: &Value, body: &Value) -> Self {
        Self::new(
            "POST /v1/messages broadcast".to_owned(),
            "broadcast",
            key,
            &serde_json::json!({ "to": target, "body": body }),
        )
    }

    /// A named operation: `POST /v1/agents/{agent}/ops/{name}` with its
    /// arguments.
    pub(crate) fn call(agent: AgentId, name: &str, key: &str, args: &Value) -> Self {
        Self::new(
            format!("POST /v1/agents/{agent}/ops/{name}"),
            "call",
            key,
            args,
        )
    }

    /// A broker call: `POST /v1/brokers/{broker}/ops/{name}` with its
    /// arguments.
    pub(crate) fn broker_call(broker: BrokerId, name: &str, key: &str, args: &Value) -> Self {
        Self::new(
            format!("POST /v1/brokers/{broker}/ops/{name}"),
            "call",
            key,
            args,
        )
    }

    /// A lifecycle call: `POST /v1/agents/{agent}/{op}`, or `DELETE
    /// /v1/agents/{agent}`.
    pub(crate) fn lifecycle(agent: AgentId, op: Op, key: &str) -> Self {
        let scope = match op {
            Op::Delete => format!("DELETE /v1/agents/{agent}"),
            _ => format!("POST /v1/agents/{agent}/{op}"),
        };
        Self::new(scope, op.as_str(), key, &Value::Object(Default::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_scoped_to_the_endpoint_and_the_agent() {
        let (a, b) = (AgentId::new(), AgentId::new());
        let body = json!({"x": 1});
        let entries = [
            Entry::message(a, "K", &body),
            Entry::message(b, "K", &body),
            Entry::batch_item(a, "K", &body),
            Entry::lifecycle(a, Op::Stop, "K"),
            Entry::lifecycle(b, Op::Stop, "K"),
            Entry::lifecycle(a, Op::Delete, "K"),
        ];
        for (i, x) in entries.iter().enumerate() {
            for y in &entries[i + 1..] {
                assert_ne!(x.key, y.key);
                assert_ne!(x.digest, y.digest);
            }
        }
    }

    #[test]
    fn the_digest_covers_the_body_but_not_its_key_order() {
        let a = AgentId::new();
        let one = Entry::message(a, "K", &json!({"x": 1, "y": 2}));
        let same = Entry::message(a, "K", &serde_json::from_str(r#"{"y":2,"x":1}"#).unwrap());
        let other = Entry::message(a, "K", &json!({"x": 1, "y": 3}));
        assert_eq!(one, same);
        assert_eq!(one.key, other.key);
        assert_ne!(one.digest, other.digest);
    }
}
