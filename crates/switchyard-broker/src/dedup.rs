//! Remembered dispatch outcomes, so a redelivered dispatch is answered
//! instead of run again (invariant 4, "effectively once").
//!
//! Each agent has a `dispatches.jsonl` of [`DispatchResult`]s. The newest
//! [`REMEMBERED`] outcomes are kept in memory and on disk; the file is
//! compacted to them when it grows past twice that. Hubs redeliver a
//! dispatch only while it is in flight, so older outcomes are never asked for.
//!
//! Invariant: an outcome is on disk before it is sent to the hub, so a
//! broker that restarts after answering never runs the dispatch again.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use switchyard_proto::DispatchResult;
use tokio::fs::File;
use uuid::Uuid;

use crate::{jsonl, layout};

/// How many outcomes per agent are remembered.
pub(crate) const REMEMBERED: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DedupError {
    #[error("cannot read dispatch log {}: {source}", path.display())]
    Load { path: PathBuf, source: io::Error },
    #[error("cannot write dispatch log {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// One agent's remembered dispatch outcomes.
#[derive(Debug)]
pub(crate) struct DispatchLog {
    dir: PathBuf,
    path: PathBuf,
    outcomes: HashMap<Uuid, DispatchResult>,
    /// Ids in the order they were recorded, oldest first.
    order: VecDeque<Uuid>,
    /// Lines in the file, to know when to compact.
    lines: usize,
    file: Option<File>,
}

impl DispatchLog {
    pub(crate) async fn open(agent_dir: &Path) -> Result<Self, DedupError> {
        let path = agent_dir.join(layout::DISPATCHES);
        let records: Vec<DispatchResult> =
            jsonl::load(&path)
                .await
                .map_err(|source| DedupError::Load {
                    path: path.clone(),
                    source,
                })?;
        let mut log = Self {
            dir: agent_dir.to_path_buf(),
            path,
            outcomes: HashMap::new(),
            order: VecDeque::new(),
            lines: records.len(),
            file: None,
        };
        for record in records {
            log.remember(record);
        }
        Ok(log)
    }

    pub(crate) fn get(&self, dispatch_id: Uuid) -> Option<&DispatchResult> {
        self.outcomes.get(&dispatch_id)
    }

    /// Persists and remembers an outcome.
    pub(crate) async fn record(&mut self, outcome: DispatchResult) -> Result<(), DedupError> {
        let path = self.path.clone();
        let err = |source| DedupError::Write {
            path: path.clone(),
            source,
        };
        let line = serde_json::to_string(&outcome).map_err(|e| err(e.into()))?;
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                tokio::fs::create_dir_all(&self.dir).await.map_err(err)?;
                self.file
                    .insert(jsonl::open_append(&path).await.map_err(err)?)
            }
        };
        if let Err(source) = jsonl::append_line(file, &line).await {
            // Rewrite from memory next time: that also drops a torn line.
            self.file = None;
            self.lines = usize::MAX;
            self.remember(outcome);
            return Err(err(source));
        }
        self.lines = self.lines.saturating_add(1);
        self.remember(outcome);
        if self.lines > 2 * REMEMBERED {
            self.compact().await.map_err(err)?;
        }
        Ok(())
    }

    fn remember(&mut self, outcome: DispatchResult) {
        let id = outcome.dispatch_id;
        if self.outcomes.insert(id, outcome).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }

    async fn compact(&mut self) -> io::Result<()> {
        self.file = None;
        let lines = self
            .order
            .iter()
            .filter_map(|id| self.outcomes.get(id))
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        jsonl::rewrite(&self.path, &lines).await?;
        self.lines = lines.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn outcome(n: usize) -> DispatchResult {
        DispatchResult {
            dispatch_id: Uuid::new_v4(),
            ok: true,
            result: Some(serde_json::json!({ "n": n })),
            error: None,
            code: None,
        }
    }

    #[tokio::test]
    async fn outcomes_survive_a_reopen_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DispatchLog::open(dir.path()).await.unwrap();
        let first = outcome(0);
        log.record(first.clone()).await.unwrap();
        assert_eq!(log.get(first.dispatch_id), Some(&first));

        let reopened = DispatchLog::open(dir.path()).await.unwrap();
        assert_eq!(reopened.get(first.dispatch_id), Some(&first));

        let mut log = reopened;
        let mut last = first.clone();
        for n in 1..=(2 * REMEMBERED + 1) {
            last = outcome(n);
            log.record(last.clone()).await.unwrap();
        }
        assert!(log.get(first.dispatch_id).is_none());
        let reopened = DispatchLog::open(dir.path()).await.unwrap();
        assert_eq!(reopened.get(last.dispatch_id), Some(&last));
        assert!(reopened.lines <= 2 * REMEMBERED);
    }
}
