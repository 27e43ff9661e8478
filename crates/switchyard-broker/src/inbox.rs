//! An agent's inbox: `inbox.jsonl`, the durable record of every message
//! handed to the agent, and the key for message dedup.
//!
//! Invariant: a message id appears at most once in the file, and a message
//! is acknowledged to the hub only after its line is on disk.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_proto::AgentMessage;
use tokio::fs::File;
use uuid::Uuid;

use crate::{jsonl, layout};

#[derive(Debug, thiserror::Error)]
pub(crate) enum InboxError {
    #[error("cannot read inbox {}: {source}", path.display())]
    Load { path: PathBuf, source: io::Error },
    #[error("cannot append to inbox {}: {source}", path.display())]
    Append { path: PathBuf, source: io::Error },
}

#[derive(Serialize)]
struct LineOut<'a> {
    id: Uuid,
    body: &'a Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    files: Vec<FileOut<'a>>,
}

/// A file sent with the message, where the broker put it.
#[derive(Serialize)]
struct FileOut<'a> {
    name: String,
    /// Relative to the agent's directory (`files/<name>`).
    path: String,
    size: u64,
    sha256: &'a str,
}

#[derive(Deserialize)]
struct LineId {
    id: Uuid,
}

/// The exact line (without the newline) recorded in `inbox.jsonl` and
/// written to the agent's stdin for a message: `{"id":"<uuid>","body":<json>}`,
/// and `"files":[{"name","path","size","sha256"}]` when files came with it
/// (`path` is relative to the agent's directory).
pub fn inbox_line(message: &AgentMessage) -> String {
    let files = message
        .attachments
        .iter()
        .map(|file| {
            let name = switchyard_proto::file_name(&file.name);
            FileOut {
                path: format!("{}/{name}", crate::files::FILES_DIR),
                name,
                size: file.size,
                sha256: &file.sha256,
            }
        })
        .collect();
    let line = LineOut {
        id: message.id,
        body: &message.body,
        files,
    };
    // A Uuid and a serde_json::Value always serialize.
    serde_json::to_string(&line).unwrap_or_default()
}

/// One agent's inbox, with the ids already in it held in memory (read from
/// the file once per broker process).
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    path: PathBuf,
    ids: HashSet<Uuid>,
    file: Option<File>,
    /// A write failed part-way: re-load (which cuts a torn line) before
    /// appending again.
    torn: bool,
}

impl Inbox {
    pub(crate) async fn open(agent_dir: &Path) -> Result<Self, InboxError> {
        let path = agent_dir.join(layout::INBOX);
        let ids = load_ids(&path).await?;
        Ok(Self {
            dir: agent_dir.to_path_buf(),
            path,
            ids,
            file: None,
            torn: false,
        })
    }

    pub(crate) fn contains(&self, id: Uuid) -> bool {
        self.ids.contains(&id)
    }

    /// Appends the message's line and syncs it. The caller checks
    /// [`Inbox::contains`] first, so an id is never appended twice.
    pub(crate) async fn append(&mut self, message: &AgentMessage) -> Result<(), InboxError> {
        if self.torn {
            self.ids.extend(load_ids(&self.path).await?);
            self.torn = false;
        }
        let path = &self.path;
        let err = |source| InboxError::Append {
            path: path.clone(),
            source,
        };
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                tokio::fs::create_dir_all(&self.dir).await.map_err(err)?;
                self.file
                    .insert(jsonl::open_append(path).await.map_err(err)?)
            }
        };
        if let Err(source) = jsonl::append_line(file, &inbox_line(message)).await {
            self.file = None;
            self.torn = true;
            return Err(err(source));
        }
        self.ids.insert(message.id);
        Ok(())
    }
}

async fn load_ids(path: &Path) -> Result<HashSet<Uuid>, InboxError> {
    let lines: Vec<LineId> = jsonl::load(path).await.map_err(|source| InboxError::Load {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(lines.into_iter().map(|l| l.id).collect())
}
