//! The named operations of the reference runtime ([`ProcessRuntime`]),
//! answered to calls (`POST /v1/agents/{agent}/ops/{name}` on the hub).
//!
//! - `inspect` → `{phase, pid, uptime_secs, exit_code, inbox_count}`.
//! - `exec` `{argv, timeout_secs?}` → `{exit_code, signal, timed_out,
//!   stdout, stderr, stdout_truncated, stderr_truncated}`: runs `argv` in
//!   the agent's directory with the agent's clean environment, in a process
//!   group of its own that is killed at the timeout (default
//!   [`EXEC_DEFAULT_TIMEOUT`], at most [`EXEC_MAX_TIMEOUT`]) and when the
//!   command ends (so nothing it started outlives the call); each output
//!   keeps its first [`EXEC_OUTPUT_CAP`] bytes.
//! - `files.list` `{path?}` → `{path, entries: [{name, kind, size}],
//!   truncated}`: at most [`LIST_MAX`] entries, sorted by name.
//! - `files.read` `{path, offset?, max_bytes?}` → `{path, size, offset,
//!   content, encoding, eof}`: at most [`READ_MAX`] bytes from `offset`;
//!   `encoding` is `utf8` when the bytes read are valid UTF-8, else
//!   `base64`.
//!
//! Broker calls (`POST /v1/brokers/{broker}/ops/{name}`), about the runtime
//! itself:
//!
//! - `agents.list` → `{agents: [{agent_id, name, phase, pid}]}`: every agent
//!   the runtime knows (deleted ones excepted), by id.
//! - `runtime.info` → `{version, agents, running}`.
//!
//! Paths are relative to the agent's directory. An absolute path or one
//! with a `..` component is refused (`invalid_args`), and so is a path that
//! resolves, through symlinks, to somewhere outside the directory; a path
//! that does not exist is `not_found`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_proto::{BrokerCall, Dispatch};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

use crate::layout;
use crate::process::ProcessRuntime;
use crate::runtime::RuntimeError;

/// `exec`'s timeout when the call gives none.
pub const EXEC_DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest timeout `exec` accepts.
pub const EXEC_MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of stdout, and of stderr, that `exec` returns.
pub const EXEC_OUTPUT_CAP: usize = 64 * 1024;
/// Most arguments in an `exec` argv, and most bytes in all of them.
const ARGV_MAX_ITEMS: usize = 256;
const ARGV_MAX_BYTES: usize = 64 * 1024;
/// Most entries `files.list` returns.
pub const LIST_MAX: usize = 1000;
/// Most bytes `files.read` returns (base64 of it still fits in one frame).
pub const READ_MAX: u64 = 128 * 1024;
/// How long the outputs of a finished command may take to close.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// Runs the call's operation.
pub(crate) async fn call(
    runtime: &ProcessRuntime,
    dispatch: &Dispatch,
) -> Result<Value, RuntimeError> {
    let name = dispatch.name.as_deref().unwrap_or_default();
    match name {
        "inspect" => inspect(runtime, dispatch).await,
        "exec" => exec(runtime, dispatch, args(dispatch)?).await,
        "files.list" => files_list(runtime, dispatch, args(dispatch)?).await,
        "files.read" => files_read(runtime, dispatch, args(dispatch)?).await,
        other => Err(RuntimeError::UnknownOperation(other.to_owned())),
    }
}

/// Runs a broker call's operation.
pub(crate) fn broker_call(
    runtime: &ProcessRuntime,
    call: &BrokerCall,
) -> Result<Value, RuntimeError> {
    let listing = runtime.listing();
    match call.name.as_str() {
        "agents.list" => {
            let agents: Vec<Value> = listing
                .into_iter()
                .map(|(id, name, phase, pid)| {
                    json!({ "agent_id": id, "name": name, "phase": phase, "pid": pid })
                })
                .collect();
            Ok(json!({ "agents": agents }))
        }
        "runtime.info" => Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "agents": listing.len(),
            "running": listing.iter().filter(|(.., pid)| pid.is_some()).count(),
        })),
        other => Err(RuntimeError::UnknownOperation(other.to_owned())),
    }
}

fn args<T: DeserializeOwned>(dispatch: &Dispatch) -> Result<T, RuntimeError> {
    let args = match &dispatch.args {
        Value::Null => json!({}),
        args => args.clone(),
    };
    serde_json::from_value(args).map_err(|err| RuntimeError::InvalidArgs(err.to_string()))
}

async fn inspect(runtime: &ProcessRuntime, dispatch: &Dispatch) -> Result<Value, RuntimeError> {
    let facts = runtime
        .facts(dispatch.agent_id)
        .ok_or(RuntimeError::UnknownAgent)?;
    let inbox = runtime.agent_dir_of(dispatch.agent_id).join(layout::INBOX);
    let inbox_count = count_lines(&inbox).await?;
    Ok(json!({
        "phase": facts.phase,
        "pid": facts.pid,
        "uptime_secs": facts.uptime.map(|u| u.as_secs_f64()),
        "exit_code": facts.exit_code,
        "inbox_count": inbox_count,
    }))
}

/// Lines in `path`, read in blocks (an inbox can be large); 0 if missing.
async fn count_lines(path: &Path) -> Result<u64, RuntimeError> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(RuntimeError::other(format!("cannot read the inbox: {err}"))),
    };
    let mut block = vec![0; 64 * 1024];
    let mut lines = 0;
    loop {
        let n = file
            .read(&mut block)
            .await
            .map_err(|err| RuntimeError::other(format!("cannot read the inbox: {err}")))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += block[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    argv: Vec<String>,
    timeout_secs: Option<u64>,
}

async fn exec(
    runtime: &ProcessRuntime,
    dispatch: &Dispatch,
    args: ExecArgs,
) -> Result<Value, RuntimeError> {
    let Some((program, rest)) = args.argv.split_first().filter(|(p, _)| !p.is_empty()) else {
        return Err(RuntimeError::InvalidArgs("argv must name a program".into()));
    };
    let bytes: usize = args.argv.iter().map(String::len).sum();
    if args.argv.len() > ARGV_MAX_ITEMS || bytes > ARGV_MAX_BYTES {
        return Err(RuntimeError::InvalidArgs(format!(
            "argv is limited to {ARGV_MAX_ITEMS} items and {ARGV_MAX_BYTES} bytes"
        )));
    }
    let timeout = match args.timeout_secs {
        None => EXEC_DEFAULT_TIMEOUT,
        Some(secs @ 1..) if secs <= EXEC_MAX_TIMEOUT.as_secs() => Duration::from_secs(secs),
        Some(secs) => {
            return Err(RuntimeError::InvalidArgs(format!(
                "timeout_secs must be 1 to {}, not {secs}",
                EXEC_MAX_TIMEOUT.as_secs()
            )));
        }
    };
    let mut child = runtime
        .command(dispatch.agent_id, &dispatch.agent, program, rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RuntimeError::Spawn {
            program: program.clone(),
            source,
        })?;
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let stdout = tokio::spawn(read_capped(child.stdout.take()));
    let stderr = tokio::spawn(read_capped(child.stderr.take()));
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (Some(status), false),
        Err(_) => (None, true),
    };
    // Whatever the command left running in its group goes with it.
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let status = match status {
        Some(status) => status,
        None => child.wait().await,
    }
    .map_err(|err| RuntimeError::other(format!("cannot wait for {program:?}: {err}")))?;
    let (stdout, stdout_truncated) = drained(stdout).await;
    let (stderr, stderr_truncated) = drained(stderr).await;
    Ok(json!({
        "exit_code": status.code(),
        "signal": status.signal(),
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": stdout_truncated,
        "stderr_truncated": stderr_truncated,
    }))
}

/// The first [`EXEC_OUTPUT_CAP`] bytes of a stream, read to its end (the
/// rest is dropped, so the writer never blocks), and whether there was
/// more.
async fn read_capped(stream: Option<impl AsyncRead + Unpin>) -> (Vec<u8>, bool) {
    let Some(mut stream) = stream else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut block = vec![0; 16 * 1024];
    let mut truncated = false;
    while let Ok(n) = stream.read(&mut block).await {
        if n == 0 {
            break;
        }
        let room = EXEC_OUTPUT_CAP - kept.len();
        kept.extend_from_slice(&block[..n.min(room)]);
        truncated |= n > room;
    }
    (kept, truncated)
}

async fn drained(reader: tokio::task::JoinHandle<(Vec<u8>, bool)>) -> (String, bool) {
    match tokio::time::timeout(OUTPUT_DRAIN, reader).await {
        Ok(Ok((bytes, truncated))) => (String::from_utf8_lossy(&bytes).into_owned(), truncated),
        _ => (String::new(), true),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default = "here")]
    path: String,
}

fn here() -> String {
    ".".into()
}

async fn files_list(
    runtime: &ProcessRuntime,
    dispatch: &Dispatch,
    args: ListArgs,
) -> Result<Value, RuntimeError> {
    let dir = confine(&runtime.agent_dir_of(dispatch.agent_id), &args.path).await?;
    let mut read = tokio::fs::read_dir(&dir)
        .await
        .map_err(|err| io_error(&args.path, err))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    while let Some(entry) = read
        .next_entry()
        .await
        .map_err(|err| io_error(&args.path, err))?
    {
        if entries.len() == LIST_MAX {
            truncated = true;
            break;
        }
        let meta = entry.metadata().await.ok();
        let kind = match meta.as_ref().map(|m| m.file_type()) {
            Some(t) if t.is_dir() => "dir",
            Some(t) if t.is_file() => "file",
            Some(t) if t.is_symlink() => "symlink",
            _ => "other",
        };
        entries.push(json!({
            "name": entry.file_name().to_string_lossy(),
            "kind": kind,
            "size": meta.filter(|m| m.is_file()).map(|m| m.len()),
        }));
    }
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(json!({ "path": args.path, "entries": entries, "truncated": truncated }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
    #[serde(default)]
    offset: u64,
    max_bytes: Option<u64>,
}

async fn files_read(
    runtime: &ProcessRuntime,
    dispatch: &Dispatch,
    args: ReadArgs,
) -> Result<Value, RuntimeError> {
    let max = match args.max_bytes {
        None => 64 * 1024,
        Some(n @ 1..) if n <= READ_MAX => n,
        Some(n) => {
            return Err(RuntimeError::InvalidArgs(format!(
                "max_bytes must be 1 to {READ_MAX}, not {n}"
            )));
        }
    };
    let path = confine(&runtime.agent_dir_of(dispatch.agent_id), &args.path).await?;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|err| io_error(&args.path, err))?;
    let meta = file
        .metadata()
        .await
        .map_err(|err| io_error(&args.path, err))?;
    if !meta.is_file() {
        return Err(RuntimeError::InvalidArgs(format!(
            "{:?} is not a file",
            args.path
        )));
    }
    let size = meta.len();
    file.seek(std::io::SeekFrom::Start(args.offset.min(size)))
        .await
        .map_err(|err| io_error(&args.path, err))?;
    let mut bytes = Vec::new();
    file.take(max)
        .read_to_end(&mut bytes)
        .await
        .map_err(|err| io_error(&args.path, err))?;
    let offset = args.offset.min(size);
    let eof = offset + bytes.len() as u64 >= size;
    let (content, encoding) = match String::from_utf8(bytes) {
        Ok(text) => (text, "utf8"),
        Err(err) => (
            base64::engine::general_purpose::STANDARD.encode(err.into_bytes()),
            "base64",
        ),
    };
    Ok(json!({
        "path": args.path,
        "size": size,
        "offset": offset,
        "content": content,
        "encoding": encoding,
        "eof": eof,
    }))
}

/// `relative` inside the agent's directory `root`, resolved; refused if it
/// is absolute, climbs with `..`, or resolves (through symlinks) outside.
async fn confine(root: &Path, relative: &str) -> Result<PathBuf, RuntimeError> {
    let path = Path::new(relative);
    let plain = path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if relative.is_empty() || !plain {
        return Err(RuntimeError::InvalidArgs(format!(
            "{relative:?}: paths are relative to the agent's directory, without '..'"
        )));
    }
    let root = tokio::fs::canonicalize(root)
        .await
        .map_err(|err| io_error(".", err))?;
    let resolved = tokio::fs::canonicalize(root.join(path))
        .await
        .map_err(|err| io_error(relative, err))?;
    if !resolved.starts_with(&root) {
        return Err(RuntimeError::InvalidArgs(format!(
            "{relative:?} leads outside the agent's directory"
        )));
    }
    Ok(resolved)
}

fn io_error(path: &str, err: std::io::Error) -> RuntimeError {
    if err.kind() == std::io::ErrorKind::NotFound {
        RuntimeError::NotFound(path.to_owned())
    } else {
        RuntimeError::other(format!("{path:?}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paths_that_leave_the_agent_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("in.txt"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        assert!(confine(root.path(), "in.txt").await.is_ok());
        assert!(confine(root.path(), "./in.txt").await.is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "escape", "escape/."] {
            let err = confine(root.path(), bad).await.unwrap_err();
            assert!(matches!(err, RuntimeError::InvalidArgs(_)), "{bad}: {err}");
        }
        assert!(matches!(
            confine(root.path(), "missing").await.unwrap_err(),
            RuntimeError::NotFound(_)
        ));
    }
}
