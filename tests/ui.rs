//! The dashboard at `/ui` in a real browser: headless Chromium driven over
//! WebDriver (a `chromedriver` process on loopback) against a real
//! `switchyard serve` and a real `switchyard broker` process. The page is
//! loaded once; everything after the sign-in must reach it through the
//! event stream, without a reload. `scripts/ensure-chromium.sh` installs
//! the browser and its driver.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use switchyard_testkit::TestDb;
use switchyard_tests::{ECHO_AGENT, Setup, TOKEN};

switchyard_testkit::on_both_backends!(
    the_dashboard_refuses_a_wrong_token_and_shows_a_broker_and_an_agent_change_live,
);

/// Every wait of this test ends within this.
const WAIT: Duration = Duration::from_secs(20);

fn chromium() -> String {
    std::env::var("SWITCHYARD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn chromedriver() -> String {
    std::env::var("SWITCHYARD_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into())
}

/// A `chromedriver` on a free loopback port, in a process group of its
/// own so that it and the browser it starts are killed together, whatever
/// way the test ends.
struct ChromeDriver {
    child: Child,
    url: String,
    profile: tempfile::TempDir,
}

impl ChromeDriver {
    async fn start() -> ChromeDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run {} ({err}): run scripts/ensure-chromium.sh",
                    chromedriver()
                )
            });
        let driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile: tempfile::tempdir().unwrap(),
        };
        let until = Instant::now() + WAIT;
        loop {
            if let Ok(resp) = reqwest::get(format!("{}/status", driver.url)).await
                && resp.status() == 200
            {
                return driver;
            }
            assert!(Instant::now() < until, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn browser(&self) -> Client {
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    // The tests run as root, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1400,1100",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Runs `script` in the page with `args`; returns what it returned.
async fn js(browser: &Client, script: &str, args: Vec<Value>) -> Value {
    browser.execute(script, args).await.unwrap()
}

/// The text of the first element matching `css`, `None` if there is none.
async fn text(browser: &Client, css: &str) -> Option<String> {
    let found = js(
        browser,
        "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
        vec![json!(css)],
    )
    .await;
    found.as_str().map(str::to_owned)
}

/// Waits until the element matching `css` says `want`.
async fn wait_text(browser: &Client, css: &str, want: &str) {
    let until = Instant::now() + WAIT;
    loop {
        let got = text(browser, css).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{css} says {got:?}, not {want:?}, after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn visible(browser: &Client, id: &str) -> bool {
    js(
        browser,
        "return !document.getElementById(arguments[0]).hidden;",
        vec![json!(id)],
    )
    .await
        == json!(true)
}

/// Waits until the page has read no snapshot for a second: whatever it
/// shows after that came through the event stream.
async fn quiet(browser: &Client) {
    let until = Instant::now() + WAIT;
    let mut last = attr(browser, "#updated", "data-reads").await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = attr(browser, "#updated", "data-reads").await;
        if now == last {
            return;
        }
        assert!(Instant::now() < until, "the page never stopped reading");
        last = now;
    }
}

/// An attribute of the first element matching `css`.
async fn attr(browser: &Client, css: &str, name: &str) -> Value {
    js(
        browser,
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        vec![json!(css), json!(name)],
    )
    .await
}

/// Types `token` into the sign-in form and submits it.
async fn sign_in(browser: &Client, token: &str) {
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(token).await.unwrap();
    browser
        .find(Locator::Id("login-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Where the screenshot goes: the target directory of this build.
fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    std::fs::create_dir_all(&target).unwrap();
    target.join(name)
}

/// The operator's path through the dashboard: a wrong token is refused
/// with a message and shows nothing; the right one shows the cluster; a
/// broker started after the page loaded turns `online`, and an agent
/// created and started through the API appears and turns `running`, and
/// work waiting for an offline broker is counted, all without reloading
/// the page (a marker set in the page survives) and without anything the
/// CSP refused; logging out forgets the token.
async fn the_dashboard_refuses_a_wrong_token_and_shows_a_broker_and_an_agent_change_live(
    db: TestDb,
) {
    let postgres = db.url().starts_with("postgres");
    let setup = Setup::new(&db, false).await;
    let driver = ChromeDriver::start().await;
    let browser = driver.browser().await;

    browser.goto(&format!("{}/ui", setup.a.base)).await.unwrap();
    js(
        &browser,
        "window.loadedOnce = true; window.violations = [];
         document.addEventListener('securitypolicyviolation',
             (e) => window.violations.push(e.violatedDirective + ' ' + e.blockedURI));",
        vec![],
    )
    .await;
    assert!(visible(&browser, "login").await);
    assert!(!visible(&browser, "dashboard").await);

    sign_in(&browser, "not-the-admin-token-0123456789").await;
    wait_text(
        &browser,
        "#login-error",
        "The hub refused this token (401 unauthorized). Check it and try again.",
    )
    .await;
    assert!(visible(&browser, "login-error").await);
    assert!(!visible(&browser, "dashboard").await, "nothing is shown");
    let stored = js(&browser, "return sessionStorage.length;", vec![]).await;
    assert_eq!(stored, json!(0), "a refused token is not kept");

    sign_in(&browser, TOKEN).await;
    wait_text(&browser, "#stream-state", "live").await;
    assert!(visible(&browser, "dashboard").await);
    assert!(!visible(&browser, "login").await);
    wait_text(
        &browser,
        "#brokers tr[data-broker='edge'] .status",
        "offline",
    )
    .await;
    wait_text(&browser, "#replicas-count", "(1)").await;

    // The broker comes online: only the stream can tell the page, once
    // the reads that followed the sign-in are over.
    quiet(&browser).await;
    let _broker = setup.broker(&[&setup.a.base], "ws");
    wait_text(
        &browser,
        "#brokers tr[data-broker='edge'] .status",
        "online",
    )
    .await;
    wait_text(&browser, "#brokers tr[data-broker='edge'] .transport", "ws").await;
    let replica = text(&browser, "#brokers tr[data-broker='edge'] .replica")
        .await
        .unwrap();
    assert_eq!(replica, setup.a.base, "held by the one replica");

    // Work for a broker that is not connected waits (no event says so:
    // the page counts it, per agent and per broker, on its next read).
    let (status, standby) = setup
        .api
        .call("POST", "/v1/brokers", Some(json!({"name": "standby"})))
        .await;
    assert_eq!(status, 201, "{standby}");
    let queued = setup
        .api
        .echo_agent(standby["id"].as_str().unwrap(), "queued")
        .await;
    setup.api.send(&queued, json!("one")).await;
    setup.api.send(&queued, json!("two")).await;

    // An agent is defined, then started, through the API.
    let (status, agent) = setup
        .api
        .call(
            "POST",
            "/v1/agents",
            Some(json!({
                "name": "worker",
                "broker_id": setup.broker_id,
                "command": ["sh", "-c", ECHO_AGENT],
                "labels": {"team": "red"},
            })),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    let agent = agent["id"].as_str().unwrap().to_owned();
    let row = "#agents tr[data-agent='worker']";
    wait_text(&browser, &format!("{row} .phase"), "created").await;
    setup.api.lifecycle("start", &agent).await;
    wait_text(&browser, &format!("{row} .phase"), "running").await;
    wait_text(&browser, &format!("{row} .labels"), "team=red").await;

    wait_text(&browser, "#agents tr[data-agent='queued'] .queue", "3").await;
    wait_text(&browser, "#brokers tr[data-broker='standby'] .queue", "3").await;
    wait_text(
        &browser,
        "#brokers tr[data-broker='standby'] .status",
        "offline",
    )
    .await;
    wait_text(&browser, "#dispatches tbody tr:first-child .state", "done").await;

    assert_eq!(
        js(&browser, "return window.loadedOnce === true;", vec![]).await,
        json!(true),
        "the page was never reloaded"
    );
    assert_eq!(
        js(&browser, "return window.violations;", vec![]).await,
        json!([]),
        "the Content-Security-Policy refused nothing the page does"
    );
    let png = browser.screenshot().await.unwrap();
    let path = screenshot_path(if postgres {
        "ui-dashboard-postgres.png"
    } else {
        "ui-dashboard.png"
    });
    std::fs::write(&path, png).unwrap();
    println!("dashboard screenshot: {}", path.display());

    browser
        .find(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(visible(&browser, "login").await);
    assert!(!visible(&browser, "dashboard").await);
    let stored = js(&browser, "return sessionStorage.length;", vec![]).await;
    assert_eq!(stored, json!(0), "logging out forgets the token");
    browser.close().await.unwrap();
}
