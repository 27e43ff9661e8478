//! A hub replica started in-process on a throwaway database and an HTTP
//! client for its API, for tests of the control channel and the API (the
//! broker driven frame by frame is `switchyard_testkit::broker`).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_hub::{Hub, HubConfig, RunningHub, token_digest};
use switchyard_store::Store;
use switchyard_testkit::TestDb;

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
