//! A replica's resources are bounded: connections, broker sessions, how
//! long a silent connection is kept, how long shutdown waits. Each limit is
//! a `HubConfig` setting, set small here.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{TestHub, fast_config};
use switchyard_hub::HubConfig;
use switchyard_proto::auth::Handshake;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::{RawBroker, upgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the hub closes the connection; fails after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 4096];
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection is still open after {within:?}"),
        }
    }
}

/// A connection that sends nothing, or stays idle after a response, is
/// closed after the header-read timeout instead of being kept forever.
#[tokio::test]
async fn silent_and_idle_connections_are_closed_after_the_header_timeout() {
    let config = HubConfig {
        header_read_timeout: Duration::from_secs(1),
        ..fast_config()
    };
    let hub = TestHub::start_with(TestDb::sqlite(), config).await;
    let addr = hub.base.trim_start_matches("http://").to_owned();

    let mut silent = TcpStream::connect(&addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;

    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "the request was served"
    );
    closed_within(&mut idle, Duration::from_secs(5)).await;
    hub.shutdown().await;
}

/// At the connection cap the replica accepts no more until one closes:
/// the extra connection waits (it is not served), and is served once a
/// slot frees up.
#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let config = HubConfig {
        max_connections: 2,
        ..fast_config()
    };
    let hub = TestHub::start_with(TestDb::sqlite(), config).await;
    let addr = hub.base.trim_start_matches("http://").to_owned();
    let first = TcpStream::connect(&addr).await.unwrap();
    let second = TcpStream::connect(&addr).await.unwrap();

    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let waiting = fresh()
        .get(hub.url("/healthz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(
        waiting.is_err(),
        "a third connection was served: {waiting:?}"
    );

    drop(first);
    drop(second);
    let served = fresh()
        .get(hub.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    hub.shutdown().await;
}

/// At the session cap, one more broker's upgrade answers 503 (so it tries
/// another replica) before anything else happens; once a session ends, a
/// new one is taken.
#[tokio::test]
async fn broker_sessions_beyond_the_cap_get_503_before_the_upgrade() {
    let config = HubConfig {
        max_sessions: 1,
        ..fast_config()
    };
    let hub = TestHub::start_with(TestDb::sqlite(), config).await;
    let (a, a_secret) = hub.broker("a").await;
    let (b, b_secret) = hub.broker("b").await;
    let first = RawBroker::connect(&hub.base, &a, &a_secret).await;
    assert_eq!(
        upgrade(&hub.base, &Handshake::new(&b, &b_secret))
            .await
            .err(),
        Some(503)
    );
    drop(first);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match upgrade(&hub.base, &Handshake::new(&b, &b_secret)).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status, 503);
                assert!(
                    Instant::now() < until,
                    "the ended session's slot was never freed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    hub.shutdown().await;
}

/// Shutdown waits for requests in progress at most the grace period: a
/// lifecycle call that would wait a minute for an absent broker does not
/// hold the replica up.
#[tokio::test]
async fn shutdown_waits_for_requests_at_most_its_grace_period() {
    let config = HubConfig {
        shutdown_grace: Duration::from_secs(1),
        lifecycle_timeout: Duration::from_secs(60),
        ..fast_config()
    };
    let hub = TestHub::start_with(TestDb::sqlite(), config).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let http = hub.http.clone();
    let url = hub.url(&format!("/v1/agents/{agent}/start"));
    let waiting = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(5), hub.shutdown())
        .await
        .expect("shutdown finished within its grace period");
    waiting.abort();
}
