//! A hub replica started in-process on a throwaway database, an HTTP
//! client for its API, and a broker driven frame by frame over a real
//! WebSocket, for tests of the control channel and the API.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchyard_hub::{Hub, HubConfig, RunningHub, token_digest};
use switchyard_proto::{BrokerFrame, HubFrame, auth, decode, encode};
use switchyard_store::Store;
use switchyard_testkit::TestDb;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TOKEN: &str = "test-admin-token-0123456789";

/// Timings short enough for tests.
pub fn fast_config() -> HubConfig {
    HubConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_secs(1),
        drain_backstop: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(200),
        lifecycle_timeout: Duration::from_secs(10),
        ..HubConfig::default()
    }
}

pub struct TestHub {
    pub db: TestDb,
    pub store: Arc<dyn Store>,
    pub hub: Option<RunningHub>,
    pub base: String,
    pub http: reqwest::Client,
}

impl TestHub {
    pub async fn start(db: TestDb) -> TestHub {
        Self::start_with(db, fast_config()).await
    }

    pub async fn start_with(db: TestDb, config: HubConfig) -> TestHub {
        let database = switchyard_store::open_database(db.url()).await.unwrap();
        let store = database.clone().into_store();
        store.add_admin_token(&token_digest(TOKEN)).await.unwrap();
        let hub = Hub::start(config, database).await.unwrap();
        let base = format!("http://{}", hub.addr());
        TestHub {
            db,
            store,
            hub: Some(hub),
            base,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An authenticated request; returns status and JSON body (Null if none).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Polls `GET path` until `check` holds; fails the test after 5 s.
    pub async fn wait_until(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, body) = self.call("GET", path, None).await;
            if check(&body) {
                return body;
            }
            assert!(tokio::time::Instant::now() < until, "{path}: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers a broker; returns (id, secret).
    pub async fn broker(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .call("POST", "/v1/brokers", Some(json!({ "name": name })))
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Defines an agent; returns its id.
    pub async fn agent(&self, broker: &str, name: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/v1/agents",
                Some(json!({ "name": name, "broker_id": broker, "command": ["sleep", "60"] })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn shutdown(mut self) {
        if let Some(hub) = self.hub.take() {
            hub.shutdown().await;
        }
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Signed upgrade headers, as a broker computes them.
pub struct Handshake {
    pub broker: String,
    pub timestamp: i64,
    pub nonce: String,
    pub signature: String,
}

impl Handshake {
    pub fn new(broker: &str, secret: &str) -> Self {
        let timestamp = chrono::Utc::now().timestamp();
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let signature = auth::sign(secret, broker, timestamp, &nonce);
        Self {
            broker: broker.to_owned(),
            timestamp,
            nonce,
            signature,
        }
    }
}

/// Opens the control channel with the given handshake. Err(status) if the
/// hub refused the upgrade.
pub async fn upgrade(hub: &TestHub, hs: &Handshake) -> Result<Socket, u16> {
    let url = format!(
        "{}/v1/brokers/connect",
        hub.base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        auth::HEADER_BROKER,
        HeaderValue::from_str(&hs.broker).unwrap(),
    );
    headers.insert(
        auth::HEADER_TIMESTAMP,
        hs.timestamp.to_string().parse().unwrap(),
    );
    headers.insert(
        auth::HEADER_NONCE,
        HeaderValue::from_str(&hs.nonce).unwrap(),
    );
    headers.insert(
        auth::HEADER_SIGNATURE,
        HeaderValue::from_str(&hs.signature).unwrap(),
    );
    let config = WebSocketConfig::default().max_message_size(Some(8 << 20));
    match tokio_tungstenite::connect_async_with_config(request, Some(config), false).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("upgrade failed: {other}"),
    }
}

/// A broker driven frame by frame by the test.
pub struct RawBroker {
    pub socket: Socket,
    pub session_id: uuid::Uuid,
}

impl RawBroker {
    /// Connects, says hello (no agents) and waits for welcome.
    pub async fn connect(hub: &TestHub, broker: &str, secret: &str) -> RawBroker {
        let mut socket = upgrade(hub, &Handshake::new(broker, secret)).await.unwrap();
        send(&mut socket, &BrokerFrame::Hello { agents: vec![] }).await;
        match recv(&mut socket).await {
            Some(HubFrame::Welcome { session_id, .. }) => RawBroker { socket, session_id },
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: &BrokerFrame) {
        send(&mut self.socket, frame).await;
    }

    /// The next frame (pings skipped); None once the socket closed.
    pub async fn recv(&mut self) -> Option<HubFrame> {
        recv(&mut self.socket).await
    }
}

pub async fn send(socket: &mut Socket, frame: &BrokerFrame) {
    socket
        .send(Message::Text(encode(frame).into()))
        .await
        .unwrap();
}

/// The next hub frame within 10 s, skipping pings; None when closed.
pub async fn recv(socket: &mut Socket) -> Option<HubFrame> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s");
        match next {
            Some(Ok(Message::Text(text))) => return Some(decode(&text).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        }
    }
}

/// Reads until the close frame and returns its code.
pub async fn close_code(socket: &mut Socket) -> Option<u16> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("the hub closes within 10 s");
        match next {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return None,
        }
    }
}
