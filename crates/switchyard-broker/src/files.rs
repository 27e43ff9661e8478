//! Fetching the files sent with a message into its agent's directory,
//! before the message is handed over and acknowledged.
//!
//! Each file lands in `<agent dir>/files/<name>`, where `name` is the
//! hub's sanitized name, sanitized here again (`switchyard_proto::file_name`:
//! the last path component, no control characters, no leading dots), so no
//! name can leave that directory whatever the hub sent. The bytes go to a
//! temporary file in the same directory first and are renamed into place
//! only once their size and SHA-256 match: a file is either whole or
//! absent, and fetching it again (a redelivered message) replaces it with
//! the same bytes. A later file of the same name replaces an earlier one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use switchyard_proto::auth::Handshake;
use switchyard_proto::{ATTACHMENT_PATH, AttachmentRef, file_name};
use tokio::io::AsyncWriteExt;

/// The directory of an agent's files, inside its directory.
pub(crate) const FILES_DIR: &str = "files";

/// How long fetching one file may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("fetching {name}: {message}")]
    Http { name: String, message: String },
    #[error("fetching {name}: the hub answered {status}")]
    Status { name: String, status: u16 },
    #[error("fetching {name}: got {got} bytes, expected {expected}")]
    Size {
        name: String,
        got: u64,
        expected: u64,
    },
    #[error("fetching {name}: its SHA-256 does not match")]
    Digest { name: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The hub of the current session over plain HTTP, with the broker's own
/// credentials: every request is signed with a fresh nonce. Used to fetch
/// files (on either transport) and by the poll transport.
#[derive(Clone)]
pub(crate) struct HubClient {
    pub(crate) http: reqwest::Client,
    /// `http(s)://host[:port][/prefix]`.
    pub(crate) base: String,
    pub(crate) broker: String,
    pub(crate) secret: String,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("base", &self.base)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl HubClient {
    /// A request to `path` on the hub, signed (a fresh nonce each time).
    pub(crate) fn signed(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        for (name, value) in Handshake::new(&self.broker, &self.secret).headers() {
            request = request.header(name, value);
        }
        request
    }

    /// Fetches `file` into `agent_dir`; returns its path relative to it.
    pub(crate) async fn fetch(
        &self,
        agent_dir: &Path,
        file: &AttachmentRef,
    ) -> Result<String, FetchError> {
        let name = file_name(&file.name);
        let http = |message: String| FetchError::Http {
            name: name.clone(),
            message,
        };
        let dir = agent_dir.join(FILES_DIR);
        let write = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Write { path, source }
        };
        tokio::fs::create_dir_all(&dir).await.map_err(write(&dir))?;
        let path = ATTACHMENT_PATH.replace("{id}", &file.id.to_string());
        let request = self
            .signed(reqwest::Method::GET, &path)
            .timeout(FETCH_TIMEOUT);
        let mut response = request.send().await.map_err(|e| http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                name,
                status: response.status().as_u16(),
            });
        }
        let temp = dir.join(format!(".{}.part", file.id));
        let mut out = tokio::fs::File::create(&temp).await.map_err(write(&temp))?;
        let mut hash = Sha256::new();
        let mut got: u64 = 0;
        let fetched: Result<(), FetchError> = async {
            while let Some(chunk) = response.chunk().await.map_err(|e| http(e.to_string()))? {
                got += chunk.len() as u64;
                if got > file.size {
                    break;
                }
                hash.update(&chunk);
                out.write_all(&chunk).await.map_err(write(&temp))?;
            }
            if got != file.size {
                return Err(FetchError::Size {
                    name: name.clone(),
                    got,
                    expected: file.size,
                });
            }
            if hex::encode(hash.finalize()) != file.sha256 {
                return Err(FetchError::Digest { name: name.clone() });
            }
            out.sync_all().await.map_err(write(&temp))?;
            Ok(())
        }
        .await;
        if let Err(err) = fetched {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(err);
        }
        let path = dir.join(&name);
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(write(&path))?;
        Ok(format!("{FILES_DIR}/{name}"))
    }
}
