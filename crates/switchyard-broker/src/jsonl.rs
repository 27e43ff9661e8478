//! Append-only JSON-lines files: the broker's durable records.
//!
//! Invariant: a record counts only once its whole line, newline included,
//! has been written and `sync_data`'d. A line torn by a crash was never
//! acknowledged to anyone, so [`load`] cuts it off instead of letting the
//! next append glue a new record onto it.

use std::io;
use std::path::Path;

use serde::de::DeserializeOwned;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;

/// Reads every complete record of `path` (none if the file does not exist)
/// and truncates a torn last line. Complete lines that do not parse as `T`
/// are skipped with a warning rather than making the whole file unreadable.
pub(crate) async fn load<T: DeserializeOwned>(path: &Path) -> io::Result<Vec<T>> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let complete = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |last| last + 1);
    if complete < bytes.len() {
        tracing::warn!(path = %path.display(), "dropping a torn last line");
        let file = OpenOptions::new().write(true).open(path).await?;
        file.set_len(complete as u64).await?;
        file.sync_data().await?;
    }
    let mut records = Vec::new();
    for line in bytes[..complete].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(record) => records.push(record),
            Err(err) => {
                tracing::warn!(path = %path.display(), "skipping an unreadable line: {err}");
            }
        }
    }
    Ok(records)
}

/// Opens `path` for appending, creating it if needed.
pub(crate) async fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// Appends one line (`line` must not contain a newline) and makes it durable.
pub(crate) async fn append_line(file: &mut File, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    file.write_all(&bytes).await?;
    file.flush().await?;
    file.sync_data().await
}

/// Replaces `path` with `lines` atomically (temp file, fsync, rename).
pub(crate) async fn rewrite(path: &Path, lines: &[String]) -> io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = File::create(&tmp).await?;
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    file.write_all(&bytes).await?;
    file.flush().await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_torn_last_line_is_cut_off_before_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        tokio::fs::write(&path, b"{\"a\":1}\nnot json\n{\"a\":2}\n{\"a\":")
            .await
            .unwrap();
        let records: Vec<serde_json::Value> = load(&path).await.unwrap();
        assert_eq!(records.len(), 2);
        let mut file = open_append(&path).await.unwrap();
        append_line(&mut file, "{\"a\":3}").await.unwrap();
        let records: Vec<serde_json::Value> = load(&path).await.unwrap();
        assert_eq!(
            records,
            vec![
                serde_json::json!({"a": 1}),
                serde_json::json!({"a": 2}),
                serde_json::json!({"a": 3})
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_file_has_no_records() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<serde_json::Value> = load(&dir.path().join("nope.jsonl")).await.unwrap();
        assert!(records.is_empty());
    }
}
