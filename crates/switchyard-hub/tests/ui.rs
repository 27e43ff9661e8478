//! The dashboard's assets as a replica serves them at `/ui` (without a
//! token: the page holds no data), and `/v1/queues`, the figure the
//! dashboard shows per broker and per agent. The browser-level test is
//! `tests/ui.rs` of the process-level suite.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::TestHub;
use serde_json::json;
use switchyard_testkit::TestDb;

switchyard_testkit::on_both_backends!(
    ui_assets_are_served_with_their_types_and_a_self_only_csp_and_reference_no_other_host,
    queues_count_unfinished_work_per_broker_and_agent_for_admins_only,
);

/// The local URLs an HTML page loads (`src="..."`, `href="..."`).
fn referenced(html: &str) -> Vec<String> {
    let mut urls = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attr) {
            let tail = &rest[at + attr.len()..];
            let end = tail.find('"').unwrap();
            urls.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    urls
}

async fn ui_assets_are_served_with_their_types_and_a_self_only_csp_and_reference_no_other_host(
    db: TestDb,
) {
    let hub = TestHub::start(db).await;
    let http = reqwest::Client::new();
    let page = http.get(hub.url("/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let html = page.text().await.unwrap();
    let assets = referenced(&html);
    assert_eq!(
        assets,
        ["/ui/app.js", "/ui/icon.png", "/ui/style.css"],
        "the page loads exactly its own assets"
    );
    let mut served = vec![("/ui".to_owned(), headers, html.into_bytes())];
    for path in assets.iter().map(String::as_str).chain(["/ui/"]) {
        let resp = http.get(hub.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        served.push((
            path.to_owned(),
            resp.headers().clone(),
            resp.bytes().await.unwrap().to_vec(),
        ));
    }

    for (path, headers, body) in &served {
        let header = |name: &str| {
            headers
                .get(name)
                .unwrap_or_else(|| panic!("{path} has no {name}"))
                .to_str()
                .unwrap()
                .to_owned()
        };
        let want = match path.rsplit_once('.').map(|(_, ext)| ext) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("png") => "image/png",
            _ => "text/html; charset=utf-8",
        };
        assert_eq!(header("content-type"), want, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        let csp = header("content-security-policy");
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        assert!(directives.contains(&"default-src 'none'"), "{path}: {csp}");
        for directive in &directives {
            let sources: Vec<&str> = directive.split_whitespace().skip(1).collect();
            assert!(
                sources.iter().all(|s| ["'self'", "'none'"].contains(s)),
                "{path}: {directive} allows something other than 'self'"
            );
        }
        let text = String::from_utf8_lossy(body).to_lowercase();
        for scheme in ["http://", "https://", "//fonts.", "@import"] {
            assert!(!text.contains(scheme), "{path} references {scheme}");
        }
    }
    let png = &served.iter().find(|(p, ..)| p == "/ui/icon.png").unwrap().2;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the icon is a PNG");
    hub.shutdown().await;
}

/// Work waiting for a broker that is offline is counted per agent and per
/// broker (its own calls included); finished work is not; the figure is
/// admin-only like the rest of `/v1`.
async fn queues_count_unfinished_work_per_broker_and_agent_for_admins_only(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let (idle_broker, _) = hub.broker("idle").await;
    // The create dispatch waits for the broker: one each.
    let worker = hub.agent(&broker, "worker").await;
    let other = hub.agent(&broker, "other").await;
    for n in 0..2 {
        let path = format!("/v1/agents/{worker}/messages");
        let (status, sent) = hub.call("POST", &path, Some(json!({ "body": n }))).await;
        assert_eq!(status, 202, "{sent}");
    }
    let path = format!("/v1/brokers/{broker}/ops/runtime.info?wait=false");
    let (status, call) = hub.call("POST", &path, Some(json!({}))).await;
    assert_eq!(status, 202, "{call}");

    let (status, queues) = hub.call("GET", "/v1/queues", None).await;
    assert_eq!(status, 200, "{queues}");
    assert_eq!(
        queues["brokers"],
        json!([{ "broker_id": broker, "depth": 5 }]),
        "3 for worker, 1 for other, 1 broker call; nothing for {idle_broker}"
    );
    let mut agents = queues["agents"].as_array().unwrap().clone();
    agents.sort_by_key(|a| a["depth"].as_i64());
    assert_eq!(
        agents,
        [
            json!({ "agent_id": other, "broker_id": broker, "depth": 1 }),
            json!({ "agent_id": worker, "broker_id": broker, "depth": 3 }),
        ]
    );

    let cancelled = call["dispatch_id"].as_str().unwrap();
    let path = format!("/v1/dispatches/{cancelled}/cancel");
    assert_eq!(hub.call("POST", &path, None).await.0, 200);
    let (_, queues) = hub.call("GET", "/v1/queues", None).await;
    assert_eq!(queues["brokers"][0]["depth"], 4, "{queues}");

    let anonymous = reqwest::get(hub.url("/v1/queues")).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    hub.shutdown().await;
}
