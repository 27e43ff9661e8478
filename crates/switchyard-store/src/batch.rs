//! Rules shared by both backends' batch inserts: validation before any
//! write, and answering each requested row with the created or the
//! idempotently matched existing row.

use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;

use crate::error::{Conflict, Invalid, StoreError, StoreResult};
use crate::ids::{BrokerId, ReplicaId};
use crate::model::{DispatchIntent, Inserted, Message, NewIntent, NewMessage};

/// Rejects empty batches, empty keys, and a key repeated within one batch.
pub(crate) fn check_batch<'a>(
    keys: impl Iterator<Item = Option<&'a str>>,
    len: usize,
) -> StoreResult<()> {
    if len == 0 {
        return Err(StoreError::Invalid(Invalid::EmptyBatch));
    }
    let mut seen = HashSet::new();
    for key in keys.flatten() {
        if key.is_empty() {
            return Err(StoreError::Invalid(Invalid::EmptyKey));
        }
        if !seen.insert(key) {
            return Err(StoreError::Invalid(Invalid::RepeatedKey(key.to_owned())));
        }
    }
    Ok(())
}

/// An item of an idempotent batch insert.
pub(crate) trait NewRow {
    fn id(&self) -> Uuid;
    fn key(&self) -> Option<&str>;
    fn digest(&self) -> Option<&str>;
}

/// A stored row that a batch item may resolve to.
pub(crate) trait StoredRow: Clone {
    fn id(&self) -> Uuid;
    fn key(&self) -> Option<&str>;
    fn digest(&self) -> Option<&str>;
    fn broker(&self) -> BrokerId;
}

macro_rules! rows {
    ($($new:ty => $stored:ty),+) => {$(
        impl NewRow for $new {
            fn id(&self) -> Uuid {
                self.id.0
            }
            fn key(&self) -> Option<&str> {
                self.idempotency_key.as_deref()
            }
            fn digest(&self) -> Option<&str> {
                self.request_digest.as_deref()
            }
        }
        impl StoredRow for $stored {
            fn id(&self) -> Uuid {
                self.id.0
            }
            fn key(&self) -> Option<&str> {
                self.idempotency_key.as_deref()
            }
            fn digest(&self) -> Option<&str> {
                self.request_digest.as_deref()
            }
            fn broker(&self) -> BrokerId {
                self.broker_id
            }
        }
    )+};
}
rows!(NewIntent => DispatchIntent, NewMessage => Message);

/// The idempotency rule, written once: an item whose key names an
/// existing row is answered with that row if it asks for the same thing
/// (same digest), and refused otherwise.
pub(crate) fn replay<N: NewRow, R: StoredRow>(item: &N, existing: R) -> StoreResult<Inserted<R>> {
    if item.digest() != existing.digest() {
        let key = item.key().unwrap_or_default().to_owned();
        return Err(StoreError::Conflict(Conflict::KeyReused(key)));
    }
    Ok(Inserted {
        row: existing,
        created: false,
        owner: None,
    })
}

/// Answers each requested item with the row inserted for it (and the
/// owner of its broker's session, from `owners`), or with the existing
/// row its idempotency key named (see [`replay`]).
pub(crate) fn match_inserted<N: NewRow, R: StoredRow>(
    requested: &[N],
    inserted: Vec<R>,
    existing: Vec<R>,
    owners: &BTreeMap<BrokerId, Option<ReplicaId>>,
) -> StoreResult<Vec<Inserted<R>>> {
    let inserted: BTreeMap<Uuid, R> = inserted.into_iter().map(|r| (r.id(), r)).collect();
    let existing: BTreeMap<String, R> = existing
        .into_iter()
        .filter_map(|r| r.key().map(|k| (k.to_owned(), r.clone())))
        .collect();
    // A reused key refuses the batch whichever item carries it.
    for item in requested {
        if let Some(row) = item.key().and_then(|k| existing.get(k)) {
            replay(item, row.clone())?;
        }
    }
    requested
        .iter()
        .map(|item| {
            if let Some(row) = inserted.get(&item.id()) {
                return Ok(Inserted {
                    row: row.clone(),
                    created: true,
                    owner: owners.get(&row.broker()).copied().flatten(),
                });
            }
            match item.key().and_then(|k| existing.get(k)) {
                Some(row) => replay(item, row.clone()),
                None => Err(StoreError::Conflict(Conflict::IdTaken(item.id()))),
            }
        })
        .collect()
}
