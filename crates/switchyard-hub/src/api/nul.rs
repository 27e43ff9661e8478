//! NUL bytes (U+0000) are refused at the edge.
//!
//! PostgreSQL cannot store them in `TEXT` or `JSONB` (it would answer 500
//! after the request was accepted), and a program cannot receive them in
//! an argument or an environment variable (SQLite would store the agent
//! and its spawn would fail later). So no string from a request that
//! could reach the database or a broker may hold one, on either backend:
//! the request extractors ([`super::extract`]) check every JSON string and
//! key, every path segment and every query value with this module before
//! a handler runs, and answer 422 `invalid` with nothing written.

use axum::http::StatusCode;
use serde_json::Value;

use super::error::ApiError;

/// Refuses `text` if it holds a NUL byte; `what` names it for the client.
pub(crate) fn refuse_in_text(what: &str, text: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        Err(refusal(what))
    } else {
        Ok(())
    }
}

/// Refuses a JSON document with a NUL byte in any string or object key, at
/// any depth; the message says where (`$.body.items[2]`).
pub(crate) fn refuse_in_json(value: &Value) -> Result<(), ApiError> {
    match path_to_nul(value) {
        Some(path) => Err(refusal(&format!("the JSON body at ${path}"))),
        None => Ok(()),
    }
}

fn refusal(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        format!("{what} contains a NUL byte (U+0000), which cannot be stored"),
    )
}

/// The JSON path of the first string or key holding a NUL byte, relative
/// to `value`. Built on the way out, so a clean document costs no
/// allocation.
fn path_to_nul(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| path_to_nul(item).map(|rest| format!("[{i}]{rest}"))),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            if key.contains('\0') {
                return Some(format!("[{key:?}]"));
            }
            path_to_nul(field).map(|rest| format!(".{key}{rest}"))
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::path_to_nul;

    #[test]
    fn nul_is_found_in_nested_strings_and_keys_and_nowhere_else() {
        assert_eq!(
            path_to_nul(&json!({"a": [1, "ok", {"b": "x\u{0}"}]})).as_deref(),
            Some(".a[2].b")
        );
        assert_eq!(
            path_to_nul(&json!({"a": {"k\u{0}": 1}})).as_deref(),
            Some(".a[\"k\\0\"]")
        );
        assert_eq!(path_to_nul(&json!("\u{0}")).as_deref(), Some(""));
        assert_eq!(
            path_to_nul(&json!({"a": ["\\u0000", null, true, 1.5]})),
            None
        );
    }
}
