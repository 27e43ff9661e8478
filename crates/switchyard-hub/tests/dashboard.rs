//! `deploy/grafana/switchyard.json` against a live replica: every metric
//! the dashboard queries is one the hub exports, with the traffic the
//! panels are about (a broker, a dispatch, a message acked, work waiting
//! for a broker that is offline).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestHub;
use serde_json::{Value, json};
use switchyard_proto::HubFrame;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;

switchyard_testkit::on_both_backends!(every_metric_the_dashboard_queries_is_exported);

/// The metric families a Prometheus expression names (histogram series
/// by their family).
fn families(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("switchyard_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.push(family.to_owned());
        rest = &tail[end..];
    }
    names
}

async fn every_metric_the_dashboard_queries_is_exported(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let (offline, _) = hub.broker("offline").await;
    hub.agent(&offline, "waiting").await;

    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let driver = tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            match frame {
                HubFrame::Dispatch(d) => broker.done(d.id).await,
                HubFrame::Message(m) => broker.ack(m.id).await,
                _ => {}
            }
        }
    });
    let path = format!("/v1/agents/{agent}/messages");
    let (status, sent) = hub.call("POST", &path, Some(json!({ "body": 1 }))).await;
    assert_eq!(status, 202, "{sent}");
    let message = sent["id"].as_str().unwrap().to_owned();
    hub.wait_until(&format!("/v1/messages/{message}"), |m| {
        m["state"] == "delivered"
    })
    .await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/grafana/switchyard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let queried: BTreeSet<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().iter())
        .flat_map(|target| families(target["expr"].as_str().unwrap()))
        .collect();
    assert!(queried.len() >= 10, "{queried:?}");

    // The sweeper (every 200 ms here) sets the queue depths.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = hub
            .http
            .get(hub.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("switchyard_queue_depth{broker=\"offline\"} 1") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no queue depth for the offline broker:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which /metrics lacks"
    );
    assert!(
        text.contains("switchyard_message_accept_to_ack_seconds_count 1"),
        "the ack was measured"
    );
    driver.abort();
    hub.shutdown().await;
}
