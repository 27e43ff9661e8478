//! The connection loop: dial the hubs in turn, authenticate, run a session,
//! and reconnect forever with jittered exponential backoff until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use switchyard_proto::auth::Handshake;
use switchyard_proto::{CONNECT_PATH, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self};
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::files::HubClient;
use crate::poll;
use crate::runtime::Runtime;
use crate::session::{self, Ended, SessionError, Socket};

/// Smallest pause between connection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Largest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A session that lived this long resets the backoff: the hub was healthy.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How long one dial (TCP connect + upgrade) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Sessions superseded in a row (none ended any other way) after which the
/// broker concludes that another process uses its credentials. A hub
/// supersedes a session now and then on its own (after losing track of
/// it); it does not do so every time.
const CONTESTED_AFTER: u32 = 3;
/// The pause after the [`CONTESTED_AFTER`]th supersession in a row; it
/// doubles with each further one, up to [`MAX_CONTESTED_PAUSE`]. Two
/// processes with one credential then hand the session back and forth a
/// few times an hour instead of every second.
const CONTESTED_PAUSE: Duration = Duration::from_secs(30);
const MAX_CONTESTED_PAUSE: Duration = Duration::from_secs(300);

/// How long `auto` polls a hub whose upgrade was refused before it tries
/// the WebSocket again.
pub const UPGRADE_RETRY: Duration = Duration::from_secs(300);

/// How a broker reaches its hubs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// The WebSocket control channel.
    #[default]
    Ws,
    /// Short HTTP requests (`hello`, `poll`, `report`): for networks that
    /// do not keep a WebSocket open.
    Poll,
    /// The WebSocket; a hub whose upgrade is refused (a proxy stripping
    /// `Upgrade`) is polled instead, and the upgrade tried again after
    /// [`UPGRADE_RETRY`].
    Auto,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ws" => Ok(Transport::Ws),
            "poll" => Ok(Transport::Poll),
            "auto" => Ok(Transport::Auto),
            other => Err(format!(
                "unknown transport {other:?}: expected ws, poll or auto"
            )),
        }
    }
}

/// What a broker needs to reach its hub.
///
/// `Debug` leaves the secret out, so a config can be logged:
///
/// ```
/// use switchyard_broker::{BrokerConfig, Transport};
///
/// let config = BrokerConfig {
///     hubs: vec!["http://hub-a:7700".to_owned(), "http://hub-b:7700".to_owned()],
///     broker: "edge-1".to_owned(),
///     secret: "s3cret".to_owned(),
///     workdir: "/var/lib/switchyard-broker".into(),
///     transport: Transport::Auto,
/// };
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct BrokerConfig {
    /// Hub base URLs (`http://host:port`, `https://...`, or `ws://`/`wss://`),
    /// tried in turn when one fails.
    pub hubs: Vec<String>,
    /// Broker id (uuid) or name, sent as-is in the `x-switchyard-broker` header.
    pub broker: String,
    /// The broker's secret; only signatures made with it leave the process.
    pub secret: String,
    /// Root of the broker's files (`<workdir>/agents/<agent-id>/...`); the
    /// runtime must use the same one.
    pub workdir: PathBuf,
    /// How to reach the hubs.
    pub transport: Transport,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("hubs", &self.hubs)
            .field("broker", &self.broker)
            .field("secret", &"<redacted>")
            .field("workdir", &self.workdir)
            .field("transport", &self.transport)
            .finish()
    }
}

/// Errors that stop the broker: configuration mistakes. Everything on the
/// network is retried, including `superseded` (the hub also says it when it
/// lost track of this session, e.g. after reaping a stalled replica). A
/// broker superseded several times in a row concludes that another process
/// uses its credentials: it logs that as an error and pauses 30 s, then
/// longer, up to 5 min, before taking the session back.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// [`BrokerConfig::hubs`] is empty.
    #[error("no hub URL given")]
    NoHubs,
    /// A hub URL cannot be turned into the control channel's WebSocket URL.
    #[error("hub URL {url:?} is not usable: {reason}")]
    HubUrl { url: String, reason: String },
    /// [`BrokerConfig::broker`] is not a valid HTTP header value.
    #[error("broker id {0:?} cannot be sent in a header")]
    BrokerId(String),
}

/// Why one dial failed.
impl DialError {
    /// The hub (or something in front of it) answered the upgrade request
    /// but would not switch protocols: a proxy that strips `Upgrade`, or
    /// refuses it. A refused credential, a full or unavailable replica and
    /// a proxy that cannot reach the hub are not that.
    fn upgrade_refused(&self) -> bool {
        match self {
            DialError::Status(status) => !matches!(status.as_u16(), 401 | 429 | 502 | 503 | 504),
            DialError::Socket(tungstenite::Error::Protocol(_)) => true,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("the hub refused the broker credentials (401)")]
    Unauthorized,
    #[error("the hub answered the upgrade with {0}")]
    Status(StatusCode),
    #[error("{0}")]
    Socket(tungstenite::Error),
    #[error("no answer within {DIAL_TIMEOUT:?}")]
    Timeout,
}

/// Runs the broker until `shutdown` is cancelled: keeps one session to one
/// of the hubs open, executing its dispatches and messages on `runtime`.
///
/// Returns `Ok` after a clean shutdown (socket closed with 1000, queued
/// work finished); `Err` for a configuration that can never work, or when
/// the hub reports that another process took over this broker's session.
/// Running agents are left alone on return; stopping them is the caller's
/// decision (see [`ProcessRuntime::shutdown`](crate::ProcessRuntime::shutdown)).
///
/// # Example
///
/// A configuration mistake ends `run` at once; a cancelled `shutdown` ends
/// it after the queued work. The crate documentation shows a broker daemon
/// that runs until Ctrl-C.
///
/// ```
/// use std::sync::Arc;
///
/// use switchyard_broker::{BrokerConfig, BrokerError, ProcessConfig, ProcessRuntime, Transport, run};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let workdir = tempfile::tempdir()?;
/// let runtime = Arc::new(ProcessRuntime::new(ProcessConfig::new(workdir.path())).await?);
/// let config = BrokerConfig {
///     hubs: vec!["ftp://127.0.0.1:7700".to_owned()],
///     broker: "edge-1".to_owned(),
///     secret: "s3cret".to_owned(),
///     workdir: workdir.path().to_owned(),
///     transport: Transport::Ws,
/// };
/// let shutdown = CancellationToken::new();
/// let refused = run(config.clone(), runtime.clone(), shutdown.clone()).await;
/// assert!(matches!(refused, Err(BrokerError::HubUrl { .. })));
///
/// let config = BrokerConfig { hubs: vec!["http://127.0.0.1:7700".to_owned()], ..config };
/// shutdown.cancel();
/// run(config, runtime, shutdown).await?;
/// # Ok(())
/// # }
/// ```
pub async fn run(
    config: BrokerConfig,
    runtime: Arc<dyn Runtime>,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    let urls = config
        .hubs
        .iter()
        .map(|hub| connect_url(hub))
        .collect::<Result<Vec<_>, _>>()?;
    let bases = config
        .hubs
        .iter()
        .map(|hub| poll_base(hub))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(BrokerError::NoHubs);
    }
    // An id no header can carry would fail every dial: refuse it up front.
    HeaderValue::from_str(&config.broker)
        .map_err(|_| BrokerError::BrokerId(config.broker.clone()))?;

    let mut executor = Executor::new(runtime.clone(), config.workdir.clone());
    let http = poll::client();
    let mut backoff = new_backoff();
    let mut superseded_in_a_row = 0u32;
    let mut next_hub = 0;
    // Per hub, until when its upgrade counts as refused (`auto`).
    let mut refused_until: Vec<Option<Instant>> = vec![None; urls.len()];
    // A poll session that reached its rotation, to go on polling if the
    // upgrade is refused again (hub index, session).
    let mut kept: Option<(usize, poll::Kept)> = None;
    'running: while !shutdown.is_cancelled() {
        let mut rotate = false;
        for k in 0..urls.len() {
            let index = (next_hub + k) % urls.len();
            let url = &urls[index];
            let base = &bases[index];
            let client = Arc::new(HubClient {
                http: http.clone(),
                base: base.clone(),
                broker: config.broker.clone(),
                secret: config.secret.clone(),
            });
            let polling = match config.transport {
                Transport::Ws => None,
                Transport::Poll => Some(None),
                Transport::Auto => refused_until[index]
                    .filter(|until| Instant::now() < *until)
                    .map(Some),
            };
            let socket = match polling {
                Some(_) => None,
                None => {
                    let dialed = tokio::select! {
                        () = shutdown.cancelled() => break 'running,
                        dialed = dial(url, &config) => dialed,
                    };
                    match dialed {
                        Ok(socket) => Some(socket),
                        Err(DialError::Unauthorized) => {
                            tracing::error!(
                                hub = %url,
                                broker = %config.broker,
                                "the hub refused this broker's credentials (401): check the broker id and secret; retrying"
                            );
                            continue;
                        }
                        Err(err)
                            if config.transport == Transport::Auto && err.upgrade_refused() =>
                        {
                            tracing::warn!(
                                hub = %url,
                                retry_secs = UPGRADE_RETRY.as_secs(),
                                "the WebSocket upgrade was refused ({err}); polling instead"
                            );
                            refused_until[index] = Some(Instant::now() + UPGRADE_RETRY);
                            None
                        }
                        Err(err) => {
                            tracing::warn!(hub = %url, "cannot connect: {err}");
                            continue;
                        }
                    }
                }
            };
            // Next time start with the following hub: if this replica is
            // going away, another one takes over sooner.
            next_hub = index + 1;
            let started = Instant::now();
            let ended = match socket {
                Some(socket) => {
                    // A poll session kept for this hub is superseded now.
                    kept = None;
                    tracing::info!(hub = %url, "connected");
                    let files = client.clone();
                    session::run(socket, files, &runtime, &mut executor, &shutdown).await
                }
                None => {
                    let until = match config.transport {
                        Transport::Auto => refused_until[index],
                        Transport::Ws | Transport::Poll => None,
                    };
                    let resume = kept
                        .take()
                        .and_then(|(hub, session)| (hub == index).then_some(session));
                    tracing::info!(hub = %base, "polling");
                    poll::run(
                        client.clone(),
                        &runtime,
                        &mut executor,
                        &shutdown,
                        until,
                        resume,
                    )
                    .await
                }
            };
            match ended {
                Ok(Ended::Shutdown) => break 'running,
                Ok(Ended::Rotate(session)) => {
                    tracing::info!(hub = %url, "trying the WebSocket upgrade again");
                    superseded_in_a_row = 0;
                    rotate = true;
                    next_hub = index;
                    refused_until[index] = None;
                    kept = Some((index, session));
                }
                Err(SessionError::HandOver) => {
                    superseded_in_a_row = 0;
                    tracing::warn!(hub = %url, "a message could not be handed over; a new session gets it again");
                }
                Err(SessionError::Superseded(message)) => {
                    superseded_in_a_row += 1;
                    tracing::warn!(hub = %url, "session superseded ({message}); reconnecting");
                }
                Err(SessionError::Unauthorized) => {
                    superseded_in_a_row = 0;
                    tracing::error!(
                        hub = %base,
                        broker = %config.broker,
                        "the hub refused this broker's credentials (401): check the broker id and secret; retrying"
                    );
                }
                Err(err) => {
                    superseded_in_a_row = 0;
                    tracing::warn!(hub = %url, "session ended: {err}");
                }
            }
            if started.elapsed() > HEALTHY_SESSION {
                backoff = new_backoff();
            }
            break;
        }
        if rotate {
            continue;
        }
        let mut delay = backoff.next().unwrap_or(MAX_BACKOFF);
        if let Some(pause) = contested_pause(superseded_in_a_row) {
            tracing::error!(
                broker = %config.broker,
                superseded_in_a_row,
                pause_secs = pause.as_secs(),
                "another process is using this broker's credentials: each of the last \
                 {superseded_in_a_row} sessions was taken over by a newer connection. Stop \
                 the other process (or give it its own broker); pausing before taking the \
                 session back"
            );
            delay = pause;
        }
        tracing::debug!(?delay, "reconnecting after a pause");
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("broker stopping; finishing queued work");
    executor.shutdown().await;
    Ok(())
}

/// The pause after `superseded_in_a_row` supersessions, once they say the
/// credentials are contested.
fn contested_pause(superseded_in_a_row: u32) -> Option<Duration> {
    let beyond = superseded_in_a_row.checked_sub(CONTESTED_AFTER)?;
    let pause = CONTESTED_PAUSE.saturating_mul(1 << beyond.min(16));
    Some(pause.min(MAX_CONTESTED_PAUSE))
}

fn new_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_jitter()
        .without_max_times()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .build()
}

/// `ws(s)://host[:port][/prefix]` -> `http(s)://host[:port][/prefix]`: the
/// base of the poll transport's requests.
pub(crate) fn poll_base(hub: &str) -> Result<String, BrokerError> {
    let connect = connect_url(hub)?;
    let base = connect.trim_end_matches(CONNECT_PATH);
    Ok(match base.split_once("://") {
        Some(("wss", rest)) => format!("https://{rest}"),
        Some((_, rest)) => format!("http://{rest}"),
        None => base.to_owned(),
    })
}

/// `http(s)://host[:port][/prefix]` -> `ws(s)://host[:port][/prefix]/v1/brokers/connect`.
pub(crate) fn connect_url(hub: &str) -> Result<String, BrokerError> {
    let bad = |reason: &str| BrokerError::HubUrl {
        url: hub.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, rest) = hub
        .split_once("://")
        .ok_or_else(|| bad("expected http://, https://, ws:// or wss://"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(bad("expected http://, https://, ws:// or wss://")),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(bad("no host"));
    }
    let url = format!("{scheme}://{rest}{CONNECT_PATH}");
    url.as_str()
        .into_client_request()
        .map_err(|err| bad(&err.to_string()))?;
    Ok(url)
}

async fn dial(url: &str, config: &BrokerConfig) -> Result<Socket, DialError> {
    let request = signed_request(url, config)?;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
    match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Err(_) => Err(DialError::Timeout),
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) => {
            if response.status() == StatusCode::UNAUTHORIZED {
                Err(DialError::Unauthorized)
            } else {
                Err(DialError::Status(response.status()))
            }
        }
        Ok(Err(err)) => Err(DialError::Socket(err)),
    }
}

/// The upgrade request with the signed handshake headers (fresh nonce).
fn signed_request(url: &str, config: &BrokerConfig) -> Result<Request, DialError> {
    let mut request = url.into_client_request().map_err(DialError::Socket)?;
    let headers = request.headers_mut();
    for (name, value) in Handshake::new(&config.broker, &config.secret).headers() {
        let value = HeaderValue::from_str(&value)
            .map_err(|e| DialError::Socket(tungstenite::Error::HttpFormat(e.into())))?;
        headers.insert(HeaderName::from_static(name), value);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_contested_credential_pauses_longer_each_time_up_to_five_minutes() {
        assert_eq!(contested_pause(CONTESTED_AFTER - 1), None);
        assert_eq!(contested_pause(CONTESTED_AFTER), Some(CONTESTED_PAUSE));
        assert_eq!(
            contested_pause(CONTESTED_AFTER + 1),
            Some(CONTESTED_PAUSE * 2)
        );
        assert_eq!(contested_pause(u32::MAX), Some(MAX_CONTESTED_PAUSE));
    }

    #[test]
    fn hub_urls_become_connect_urls() {
        assert_eq!(
            connect_url("http://127.0.0.1:7700").unwrap(),
            "ws://127.0.0.1:7700/v1/brokers/connect"
        );
        assert_eq!(
            connect_url("https://hub.example/base/").unwrap(),
            "wss://hub.example/base/v1/brokers/connect"
        );
        assert_eq!(
            connect_url("ws://h:1").unwrap(),
            "ws://h:1/v1/brokers/connect"
        );
        assert!(connect_url("ftp://h").is_err());
        assert!(connect_url("127.0.0.1:7700").is_err());
        assert!(connect_url("http://").is_err());
    }
}
