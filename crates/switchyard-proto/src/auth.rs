//! The signed control-channel handshake.
//!
//! A broker proves it knows its secret without sending it: the upgrade
//! request carries a timestamp, a fresh nonce and
//! `hex(HMAC-SHA256(key, canonical))`, where `key = SHA-256(secret)` and
//! `canonical = "switchyard-connect-v1\n{broker}\n{timestamp}\n{nonce}"`.
//! The hub stores only `key` (as lowercase hex): enough to verify, never the
//! secret itself. It rejects timestamps outside [`MAX_CLOCK_SKEW_SECS`] and
//! any nonce it has seen before (replay).
//!
//! [`Handshake`] is the one place that signs; [`verify`] is the one place
//! that checks.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How far a handshake timestamp may be from the hub's clock.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// The broker id (UUID or name) header of the upgrade request.
pub const HEADER_BROKER: &str = "x-switchyard-broker";
/// Unix seconds at signing time.
pub const HEADER_TIMESTAMP: &str = "x-switchyard-timestamp";
/// A value never used before by this broker (16–128 characters).
pub const HEADER_NONCE: &str = "x-switchyard-nonce";
/// `hex(HMAC-SHA256(SHA-256(secret), canonical))`.
pub const HEADER_SIGNATURE: &str = "x-switchyard-signature";

/// The value the hub stores for a broker secret: `hex(SHA-256(secret))`.
pub fn secret_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn canonical(broker: &str, timestamp: i64, nonce: &str) -> String {
    format!("switchyard-connect-v1\n{broker}\n{timestamp}\n{nonce}")
}

fn mac(key_hex: &str) -> Option<Hmac<Sha256>> {
    let key = hex::decode(key_hex).ok()?;
    Hmac::<Sha256>::new_from_slice(&key).ok()
}

/// The signature a broker sends (computed from its secret).
pub fn sign(secret: &str, broker: &str, timestamp: i64, nonce: &str) -> String {
    let mut mac = mac(&secret_key(secret)).expect("a SHA-256 digest is a valid HMAC key");
    mac.update(canonical(broker, timestamp, nonce).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The signed handshake headers of one upgrade request.
///
/// Every value is fresh per request: a nonce the hub has seen is a replay,
/// so a `Handshake` is built for each dial and never reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Broker id (UUID) or name, exactly as signed.
    pub broker: String,
    /// Unix seconds at signing time.
    pub timestamp: i64,
    /// 32 lowercase hex characters from a random UUID.
    pub nonce: String,
    /// [`sign`] over the three values above.
    pub signature: String,
}

impl Handshake {
    /// Signs for `broker` now, with a fresh nonce.
    pub fn new(broker: &str, secret: &str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Self::signed_at(broker, secret, now)
    }

    /// Signs for `broker` as of `timestamp` (Unix seconds), with a fresh
    /// nonce; tests use it to present a clock outside the hub's tolerance.
    pub fn signed_at(broker: &str, secret: &str, timestamp: i64) -> Self {
        let nonce = Uuid::new_v4().simple().to_string();
        let signature = sign(secret, broker, timestamp, &nonce);
        Self {
            broker: broker.to_owned(),
            timestamp,
            nonce,
            signature,
        }
    }

    /// The four upgrade-request headers, as (name, value) pairs.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_BROKER, self.broker.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }
}

/// Checks a signature against the stored key, in constant time.
pub fn verify(key_hex: &str, broker: &str, timestamp: i64, nonce: &str, signature: &str) -> bool {
    let (Some(mut mac), Ok(signature)) = (mac(key_hex), hex::decode(signature)) else {
        return false;
    };
    mac.update(canonical(broker, timestamp, nonce).as_bytes());
    mac.verify_slice(&signature).is_ok()
}

/// Whether a nonce has an acceptable shape.
pub fn nonce_is_valid(nonce: &str) -> bool {
    (16..=128).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_the_same_inputs() {
        let key = secret_key("s3cret");
        let sig = sign("s3cret", "edge-1", 1_700_000_000, "nonce-0123456789");
        assert!(verify(
            &key,
            "edge-1",
            1_700_000_000,
            "nonce-0123456789",
            &sig
        ));
        assert!(!verify(
            &key,
            "edge-2",
            1_700_000_000,
            "nonce-0123456789",
            &sig
        ));
        assert!(!verify(
            &key,
            "edge-1",
            1_700_000_001,
            "nonce-0123456789",
            &sig
        ));
        assert!(!verify(
            &key,
            "edge-1",
            1_700_000_000,
            "nonce-0123456780",
            &sig
        ));
        assert!(!verify(
            &secret_key("other"),
            "edge-1",
            1_700_000_000,
            "nonce-0123456789",
            &sig
        ));
        assert!(!verify(
            &key,
            "edge-1",
            1_700_000_000,
            "nonce-0123456789",
            "zz"
        ));
    }
}
