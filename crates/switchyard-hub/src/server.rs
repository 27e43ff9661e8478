//! The HTTP server of a replica: accepts connections up to a cap, closes
//! the ones that send no request in time, and shuts down within a grace
//! period.
//!
//! Why not `axum::serve`: it has no connection cap and no header-read or
//! idle timeout, so sockets that send nothing stay open forever and enough
//! of them make the replica deaf. Here, as in mini-redis's accept loop, a
//! semaphore permit is taken *before* accepting: at the cap, new
//! connections wait in the kernel's backlog instead of costing memory and
//! descriptors. HTTP/1 connections get `header_read_timeout` both for their
//! first request and between requests (keep-alive idle).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// What bounds the server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections served at once (WebSocket sessions leave this count once
    /// upgraded; they have their own cap).
    pub(crate) max_connections: usize,
    /// How long a connection may take to send a request's headers, and may
    /// stay idle between requests.
    pub(crate) header_read_timeout: Duration,
    /// How long shutdown waits for requests in progress before it closes
    /// what is left.
    pub(crate) shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then for at most
/// `limits.shutdown_grace` while requests finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Cancelled when the grace period is over: dropping a connection's
    // future drops the request handlers it drives.
    let hard_stop = CancellationToken::new();
    let connections = TaskTracker::new();
    // HTTP/1 only: brokers and API clients speak it, and guessing the
    // version (as an "auto" server does) reads the first bytes with no
    // timeout at all.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors, usually: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            app.clone().oneshot(request.map(Body::new))
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut finishing = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(err) = served {
                            tracing::debug!(%err, "connection ended with an error");
                        }
                        break;
                    }
                    // Finish the request in progress, take no new one.
                    () = shutdown.cancelled(), if !finishing => {
                        connection.as_mut().graceful_shutdown();
                        finishing = true;
                    }
                    () = hard_stop.cancelled() => break,
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(
                grace_secs = limits.shutdown_grace.as_secs_f64(),
                "requests still in progress after the shutdown grace period; closing them"
            );
        }
    }
    hard_stop.cancel();
    connections.wait().await;
}
