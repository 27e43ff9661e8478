//! Rules shared by both backends' batch inserts: validation before any
//! write, and answering each requested row with the created or the
//! idempotently matched existing row.

use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;

use crate::error::{StoreError, StoreResult};
use crate::model::Inserted;

/// Rejects empty batches, empty keys, and a key repeated within one batch.
pub(crate) fn check_batch<'a>(
    keys: impl Iterator<Item = Option<&'a str>>,
    len: usize,
) -> StoreResult<()> {
    if len == 0 {
        return Err(StoreError::Invalid("empty batch".into()));
    }
    let mut seen = HashSet::new();
    for key in keys.flatten() {
        if key.is_empty() {
            return Err(StoreError::Invalid("empty idempotency key".into()));
        }
        if !seen.insert(key) {
            return Err(StoreError::Invalid(format!(
                "idempotency key {key:?} appears twice in one batch"
            )));
        }
    }
    Ok(())
}

/// Pairs each requested row with the inserted one, or with the existing row
/// its idempotency key named.
pub(crate) fn match_inserted<T: Clone>(
    requested: &[(Uuid, Option<String>)],
    inserted: Vec<T>,
    existing: Vec<T>,
    id_of: impl Fn(&T) -> Uuid,
    key_of: impl Fn(&T) -> Option<&str>,
) -> StoreResult<Vec<Inserted<T>>> {
    let inserted: BTreeMap<Uuid, T> = inserted.into_iter().map(|r| (id_of(&r), r)).collect();
    let existing: BTreeMap<String, T> = existing
        .into_iter()
        .filter_map(|r| key_of(&r).map(|k| (k.to_owned(), r.clone())))
        .collect();
    requested
        .iter()
        .map(|(id, key)| {
            if let Some(row) = inserted.get(id) {
                return Ok(Inserted {
                    row: row.clone(),
                    created: true,
                });
            }
            key.as_ref()
                .and_then(|k| existing.get(k))
                .map(|row| Inserted {
                    row: row.clone(),
                    created: false,
                })
                .ok_or_else(|| StoreError::Conflict(format!("id {id} exists already")))
        })
        .collect()
}
