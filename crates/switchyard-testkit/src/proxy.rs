//! A loopback TCP proxy that a test controls, for fault tests.
//!
//! Put a [`TcpProxy`] between the code under test and a server (typically
//! the test PostgreSQL), hand the code the proxy's address, and call
//! [`TcpProxy::cut`] to drop every connection through it at once, as a
//! network partition would look to a hub replica; [`TcpProxy::restore`]
//! lets new connections through again. Only the one server behind the proxy
//! is affected, so other replicas and the test's own admin connections keep
//! working.
//!
//! [`TcpProxy::refusing_upgrades`] makes it an HTTP proxy that strips
//! WebSocket support, as some corporate proxies do: a connection whose first
//! request asks for `Upgrade` is answered 403 and closed; every other one
//! is forwarded. (WebSocket clients open a connection for the upgrade, so
//! the first request of a connection is the one to look at.)
//!
//! The proxy listens on 127.0.0.1 only and refuses non-loopback targets:
//! fault tests must never reach beyond the machine they run on.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most connections forwarded at once; more are refused like during a cut.
const MAX_CONNECTIONS: usize = 256;

/// How long a forwarding task waits for the target to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// accept loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A TCP proxy on 127.0.0.1 whose connections a test can cut and restore.
///
/// Every connection accepted on [`addr`](Self::addr) is forwarded to the
/// target given to [`start`](Self::start). Dropping the proxy stops the
/// accept loop and closes every forwarded connection. Must be started and
/// dropped inside a Tokio runtime.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    /// Answer requests that ask for `Upgrade` with 403 instead of forwarding.
    refuse_upgrades: bool,
    accepted: AtomicUsize,
    /// Cancelled when the proxy is dropped; parent of every generation.
    shutdown: CancellationToken,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
}

#[derive(Debug)]
struct State {
    /// True between `cut` and `restore`: new connections are refused.
    cut: bool,
    /// Cancelled (and replaced) by `cut`; every forwarding task holds the
    /// token of the generation it was accepted in.
    generation: CancellationToken,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic, but a poisoned
        // state is still consistent (a bool and a token), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to
    /// `target` (e.g. 127.0.0.1:5432), which must be a loopback address.
    pub async fn start(target: SocketAddr) -> std::io::Result<TcpProxy> {
        Self::start_with(target, false).await
    }

    /// Like [`start`](Self::start), but a connection whose first request
    /// asks for a protocol upgrade (a WebSocket) is answered `403
    /// Forbidden` and closed instead of forwarded.
    pub async fn refusing_upgrades(target: SocketAddr) -> std::io::Result<TcpProxy> {
        Self::start_with(target, true).await
    }

    async fn start_with(target: SocketAddr, refuse_upgrades: bool) -> std::io::Result<TcpProxy> {
        if !target.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("TcpProxy only forwards to loopback addresses, not {target}"),
            ));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            target,
            refuse_upgrades,
            accepted: AtomicUsize::new(0),
            state: Mutex::new(State {
                cut: false,
                generation: shutdown.child_token(),
            }),
            shutdown,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(TcpProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection at once (both directions, with a TCP
    /// reset) and refuses new ones (accepted, then closed immediately)
    /// until [`restore`](Self::restore).
    pub fn cut(&self) {
        let mut state = self.shared.state();
        state.cut = true;
        state.generation.cancel();
        state.generation = self.shared.shutdown.child_token();
    }

    /// Forwards new connections again. Connections dropped by
    /// [`cut`](Self::cut) stay dropped; clients have to reconnect.
    pub fn restore(&self) {
        self.shared.state().cut = false;
    }

    /// Number of connections accepted so far, including refused ones.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Ends every forwarding task (their tokens are children of this
        // one) and the accept loop, which closes the listener.
        self.shared.shutdown.cancel();
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        // Decide under the lock, so a concurrent `cut` either refuses this
        // connection or cancels the token it gets.
        let generation = {
            let state = shared.state();
            (!state.cut).then(|| state.generation.clone())
        };
        let slot = Arc::clone(&shared.slots).try_acquire_owned().ok();
        let (Some(generation), Some(slot)) = (generation, slot) else {
            reset(client);
            continue;
        };
        let target = shared.target;
        let refuse_upgrades = shared.refuse_upgrades;
        tokio::spawn(async move {
            let head = if refuse_upgrades {
                match first_request_head(client).await {
                    Some(forwarded) => forwarded,
                    None => return,
                }
            } else {
                (client, Vec::new())
            };
            forward(head.0, head.1, target, generation).await;
            drop(slot);
        });
    }
}

/// Most bytes read while looking for the end of a request head.
const MAX_HEAD: usize = 16 * 1024;

/// Reads the first request head of `client`; answers 403 (and returns
/// `None`) if it asks for an upgrade, else returns the connection and the
/// bytes read, to be forwarded first.
async fn first_request_head(mut client: TcpStream) -> Option<(TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let read = tokio::time::timeout(CONNECT_TIMEOUT, client.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let upgrade = text.split("\r\n").any(|line| line.starts_with("upgrade:"));
    if upgrade {
        let refusal = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let _ = client.write_all(refusal).await;
        let _ = client.shutdown().await;
        return None;
    }
    Some((client, head))
}

/// Forwards between `client` and `target` (sending `first` upstream
/// first) until either side is done or `generation` is cancelled, in which
/// case both are reset.
async fn forward(
    client: TcpStream,
    first: Vec<u8>,
    target: SocketAddr,
    generation: CancellationToken,
) {
    let upstream = tokio::select! {
        () = generation.cancelled() => None,
        connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => {
            connected.ok().and_then(Result::ok)
        }
    };
    let Some(mut upstream) = upstream else {
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if !first.is_empty() {
        use tokio::io::AsyncWriteExt;
        if upstream.write_all(&first).await.is_err() {
            reset(client);
            return;
        }
    }
    let mut client = client;
    let cancelled = tokio::select! {
        () = generation.cancelled() => true,
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
    };
    if cancelled {
        reset(client);
        reset(upstream);
    }
}

/// Closes `stream` with a TCP reset rather than an orderly FIN, so the peer
/// sees the connection die at once whatever it is doing.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use sqlx::{Connection, PgConnection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const STEP: Duration = Duration::from_secs(1);

    /// An echo server on 127.0.0.1:0; runs until the test's runtime ends.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `msg` and expects it back.
    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
        let (mut r, mut w) = stream.split();
        let mut buf = vec![0; msg.len()];
        // Write and read at once, so large messages cannot fill both
        // directions' buffers and stall.
        let (written, read) = tokio::time::timeout(STEP, async {
            tokio::join!(w.write_all(msg), r.read_exact(&mut buf))
        })
        .await
        .expect("echo in time");
        written.unwrap();
        read.unwrap();
        assert_eq!(buf, msg);
    }

    /// Asserts that `stream` ends (EOF or error) within a second.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0; 16];
        match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("read {n} bytes from a connection that should be closed"),
            Err(_) => panic!("connection still open after {STEP:?}"),
        }
    }

    /// Connects through the proxy and expects it to close the connection.
    async fn assert_refused(addr: SocketAddr) {
        // Refusing the connect outright would do too.
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            assert_closed(&mut stream).await;
        }
    }

    #[tokio::test]
    async fn forwards_bytes_both_ways() {
        let proxy = TcpProxy::start(echo_server().await).await.unwrap();
        assert!(proxy.addr().ip().is_loopback());
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut a, b"hello").await;
        round_trip(&mut b, b"world").await;
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        round_trip(&mut a, &big).await;
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn cut_drops_open_connections_and_refuses_new_ones_until_restore() {
        let proxy = TcpProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut open, b"before").await;

        proxy.cut();
        assert_closed(&mut open).await;
        assert_refused(proxy.addr()).await;
        assert_refused(proxy.addr()).await;
        assert_eq!(proxy.accepted(), 3);

        proxy.restore();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut fresh, b"after").await;
        assert_eq!(proxy.accepted(), 4);

        // A second cut works the same way.
        proxy.cut();
        assert_closed(&mut fresh).await;
        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut again, b"again").await;
    }

    #[tokio::test]
    async fn drop_stops_listener_and_connections() {
        let proxy = TcpProxy::start(echo_server().await).await.unwrap();
        let addr = proxy.addr();
        let mut open = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut open, b"hi").await;

        drop(proxy);
        assert_closed(&mut open).await;
        // The listener goes away once the runtime drops the accept task.
        let refused = tokio::time::timeout(STEP, async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "proxy still accepting after drop");
    }

    #[tokio::test]
    async fn refuses_non_loopback_targets() {
        let err = TcpProxy::start("192.0.2.1:5432".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    async fn select_one(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(conn)
            .await
    }

    #[tokio::test]
    async fn cuts_a_postgres_connection() {
        let admin = url::Url::parse(&crate::admin_url()).unwrap();
        let target = admin
            .socket_addrs(|| Some(5432))
            .unwrap()
            .into_iter()
            .find(|a| a.ip().is_loopback())
            .expect("test PostgreSQL on loopback");
        let proxy = TcpProxy::start(target).await.unwrap();
        let mut via_proxy = admin.clone();
        via_proxy.set_host(Some("127.0.0.1")).unwrap();
        via_proxy.set_port(Some(proxy.addr().port())).unwrap();
        let url = via_proxy.to_string();

        let mut conn = PgConnection::connect(&url).await.unwrap();
        assert_eq!(select_one(&mut conn).await.unwrap(), 1);

        proxy.cut();
        let failed = tokio::time::timeout(STEP, select_one(&mut conn))
            .await
            .expect("query fails in time rather than hanging");
        assert!(failed.is_err(), "query through a cut proxy succeeded");
        let reconnect = tokio::time::timeout(STEP, PgConnection::connect(&url))
            .await
            .expect("connect fails in time rather than hanging");
        assert!(reconnect.is_err(), "connected through a cut proxy");
        drop(conn);

        proxy.restore();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        assert_eq!(select_one(&mut conn).await.unwrap(), 1);
        conn.close().await.unwrap();
        assert_eq!(proxy.accepted(), 3);
    }
}
