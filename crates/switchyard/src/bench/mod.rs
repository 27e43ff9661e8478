//! `switchyard bench`: starts an in-process hub cluster on one database,
//! connects in-process brokers over real WebSockets (and, for the poll
//! scenarios, over the poll transport), and measures message throughput
//! and latency and lifecycle round trips. See `docs/benchmarks.md`.

mod baseline;
mod broker;
mod poll_broker;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use switchyard_hub::{Hub, HubConfig, RunningHub, token_digest};
use switchyard_store::Database;
use tokio::task::JoinSet;
use uuid::Uuid;

use broker::{AckBook, BenchBroker};
use stats::{Scrape, percentile_ms};

const ALL_SCENARIOS: &[&str] = &[
    "local",
    "cross-node",
    "lifecycle-local",
    "lifecycle-cross",
    "op-local",
    "op-cross",
    "poll-local",
    "poll-cross",
];
/// Longest a scenario waits for its last ack after its last POST returned.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one HTTP call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a replica may take to shut down.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// Hub replicas to start in this process (PostgreSQL only for more than 1).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Database to run on (not read from DATABASE_URL on purpose: the bench
    /// writes brokers, agents and messages). Default: a fresh SQLite file
    /// in a temporary directory. Use a throwaway database.
    #[arg(long)]
    database_url: Option<String>,
    /// Bench brokers (each with one agent), spread over the replicas.
    #[arg(long, default_value_t = 4)]
    brokers: usize,
    /// Messages per message scenario.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Concurrent HTTP requests in flight (closed loop), or the most in
    /// flight with --rate.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Messages per request: 1 uses `POST /v1/agents/{agent}/messages`,
    /// more uses `POST /v1/messages`.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Comma-separated scenarios: local, cross-node, lifecycle-local,
    /// lifecycle-cross, op-local, op-cross, poll-local, poll-cross
    /// (default: all; the cross ones need 2+ replicas). poll-local and
    /// poll-cross are local and cross-node with brokers on the poll
    /// transport instead of WebSockets.
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
    /// Offered load in messages per second, sent open-loop on a fixed
    /// schedule (default: closed loop, as fast as --concurrency allows).
    #[arg(long)]
    rate: Option<f64>,
    /// PostgreSQL only: first measure the database's own INSERT ceiling.
    #[arg(long)]
    baseline: bool,
}

/// One agent of the bench, with the replica its broker is connected to.
#[derive(Debug, Clone)]
struct BenchAgent {
    id: String,
    home: usize,
}

#[derive(Debug, Clone)]
struct Ctx {
    http: reqwest::Client,
    token: String,
    bases: Vec<String>,
    agents: Vec<BenchAgent>,
    /// Agent indexes by home replica.
    by_home: Vec<Vec<usize>>,
    acks: Arc<AckBook>,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.replicas == 0 || args.brokers == 0 || args.messages == 0 {
        bail!("--replicas, --brokers and --messages must be at least 1");
    }
    if args.concurrency == 0 || args.batch_size == 0 {
        bail!("--concurrency and --batch-size must be at least 1");
    }
    if args.brokers < args.replicas {
        bail!(
            "--brokers ({}) must be at least --replicas ({}): every replica holds a broker",
            args.brokers,
            args.replicas
        );
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate must be a positive number of messages per second");
    }
    let scenarios: Vec<String> = match &args.scenarios {
        Some(list) => {
            for s in list {
                if !ALL_SCENARIOS.contains(&s.as_str()) {
                    bail!(
                        "unknown scenario {s:?}; known: {}",
                        ALL_SCENARIOS.join(", ")
                    );
                }
                if s.contains("cross") && args.replicas < 2 {
                    bail!("scenario {s} needs --replicas 2 or more");
                }
            }
            list.clone()
        }
        None => ALL_SCENARIOS
            .iter()
            .filter(|s| args.replicas > 1 || !s.contains("cross"))
            .map(|s| (*s).to_owned())
            .collect(),
    };

    let tempdir;
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            tempdir = tempfile::tempdir().context("creating a temporary directory")?;
            format!("sqlite://{}", tempdir.path().join("bench.db").display())
        }
    };
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !postgres && args.replicas > 1 {
        bail!(
            "SQLite runs a single replica: use --replicas 1, or a postgres:// --database-url \
             for {} replicas",
            args.replicas
        );
    }
    if args.baseline && !postgres {
        bail!("--baseline measures PostgreSQL; it needs a postgres:// --database-url");
    }

    let database = switchyard_store::open_database(&url).await?;
    let baseline = if args.baseline {
        let b = baseline::measure(&url, args.concurrency).await?;
        println!(
            "scenario=baseline batched_insert={:.0}/s single_commit_p50={:.2}",
            b.batched_rows_per_sec, b.single_commit_p50_ms
        );
        Some(b)
    } else {
        None
    };

    let token = format!("bench-{}", Uuid::new_v4().simple());
    database
        .clone()
        .into_store()
        .add_admin_token(&token_digest(&token))
        .await?;

    // Replicas: on PostgreSQL each gets its own pool.
    let mut hubs: Vec<RunningHub> = Vec::new();
    let mut pools: Vec<Database> = vec![database.clone()];
    let started = start_replicas(&args, &url, postgres, &database, &mut hubs, &mut pools).await;
    let mut brokers: Vec<BenchBroker> = Vec::new();
    let outcome = match started {
        Ok(()) => {
            bench(
                &args,
                &scenarios,
                baseline.as_ref(),
                &hubs,
                token,
                &mut brokers,
            )
            .await
        }
        Err(err) => Err(err),
    };

    // Clean up whatever happened above.
    let mut cleanup_errors = Vec::new();
    for b in brokers {
        match b.close().await {
            Ok(counts) => tracing::debug!(?counts, "bench broker closed"),
            Err(err) => cleanup_errors.push(format!("{err:#}")),
        }
    }
    for hub in hubs {
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, hub.shutdown())
            .await
            .is_err()
        {
            cleanup_errors.push("a replica did not shut down within 30 s".to_owned());
        }
    }
    for db in pools {
        match db {
            Database::Postgres(pool) => pool.close().await,
            Database::Sqlite(pool) => pool.close().await,
        }
    }
    outcome?;
    if !cleanup_errors.is_empty() {
        bail!("cleanup failed: {}", cleanup_errors.join("; "));
    }
    Ok(())
}

async fn start_replicas(
    args: &BenchArgs,
    url: &str,
    postgres: bool,
    database: &Database,
    hubs: &mut Vec<RunningHub>,
    pools: &mut Vec<Database>,
) -> anyhow::Result<()> {
    for i in 0..args.replicas {
        let db = if postgres && i > 0 {
            let db = switchyard_store::open_database(url).await?;
            pools.push(db.clone());
            db
        } else {
            database.clone()
        };
        let config = HubConfig {
            listen: "127.0.0.1:0".parse()?,
            ..HubConfig::default()
        };
        hubs.push(Hub::start(config, db).await?);
    }
    Ok(())
}

async fn bench(
    args: &BenchArgs,
    scenarios: &[String],
    baseline: Option<&baseline::Baseline>,
    hubs: &[RunningHub],
    token: String,
    brokers: &mut Vec<BenchBroker>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .pool_max_idle_per_host(args.concurrency.max(16))
        .build()?;
    let bases: Vec<String> = hubs
        .iter()
        .map(|h| format!("http://{}", h.addr()))
        .collect();
    let ctx = Ctx {
        http,
        token,
        bases,
        agents: Vec::new(),
        by_home: vec![Vec::new(); hubs.len()],
        acks: Arc::new(AckBook::default()),
    };
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ctx = add_brokers(&ctx, args, hubs, &run_id, Transport::WebSocket, brokers).await?;
    // Affinity is claimed asynchronously after the welcome: wait until
    // every broker shows as connected to its replica.
    wait_connected(&ctx, hubs).await?;
    // The poll scenarios get brokers (and agents) of their own, so the
    // WebSocket brokers stay connected for the other scenarios.
    let poll_ctx = if scenarios.iter().any(|s| s.starts_with("poll-")) {
        let poll_ctx = add_brokers(&ctx, args, hubs, &run_id, Transport::Poll, brokers).await?;
        wait_connected(&poll_ctx, hubs).await?;
        Some(poll_ctx)
    } else {
        None
    };

    for name in scenarios {
        let before = ctx.scrape().await?;
        let line = match name.as_str() {
            "local" => message_scenario(&ctx, args, false).await?,
            "cross-node" => message_scenario(&ctx, args, true).await?,
            "lifecycle-local" => lifecycle_scenario(&ctx, args, false, Call::Restart).await?,
            "lifecycle-cross" => lifecycle_scenario(&ctx, args, true, Call::Restart).await?,
            "op-local" => lifecycle_scenario(&ctx, args, false, Call::NoOp).await?,
            "op-cross" => lifecycle_scenario(&ctx, args, true, Call::NoOp).await?,
            "poll-local" | "poll-cross" => {
                let poll_ctx = poll_ctx.as_ref().context("no poll bench brokers")?;
                message_scenario(poll_ctx, args, name == "poll-cross").await?
            }
            other => bail!("unknown scenario {other}"),
        };
        let delta = ctx.scrape().await?.since(&before);
        let mut out = format!(
            "scenario={name} n={} throughput={:.0}/s p50={:.2} p90={:.2} p99={:.2} notifies={}",
            line.n, line.throughput, line.p50, line.p90, line.p99, delta.notifications_sent
        );
        if let Some(recorded) = line.recorded_throughput {
            out.push_str(&format!(" recorded={recorded:.0}/s"));
        }
        if line.messages
            && let Some(b) = baseline
        {
            out.push_str(&format!(
                " of_baseline={:.3}",
                line.throughput / b.batched_rows_per_sec
            ));
        }
        println!("{out}");
        let drain_mean_ms = if delta.drain_count > 0.0 {
            delta.drain_sum / delta.drain_count * 1e3
        } else {
            0.0
        };
        let intent_mean_ms = if delta.intent_count > 0.0 {
            delta.intent_sum / delta.intent_count * 1e3
        } else {
            0.0
        };
        eprintln!(
            "  detail {name}: elapsed={:.2}s routes local={} forward={} queued={} \
             notifies_received={} drains={} drain_mean={drain_mean_ms:.2}ms \
             delivered={} intent_to_done_mean={intent_mean_ms:.2}ms{}",
            line.elapsed.as_secs_f64(),
            delta.route_local,
            delta.route_forward,
            delta.route_queued,
            delta.notifications_received,
            delta.drain_count,
            delta.messages_delivered,
            line.note,
        );
    }
    Ok(())
}

/// How a set of bench brokers talks to the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Poll,
}

/// Creates `--brokers` brokers, each with one agent, spread over the
/// replicas in turn, and connects each to its replica over `transport`
/// (into `brokers`, so they are closed however the bench ends). Returns
/// `ctx` with these agents.
async fn add_brokers(
    ctx: &Ctx,
    args: &BenchArgs,
    hubs: &[RunningHub],
    run_id: &str,
    transport: Transport,
    brokers: &mut Vec<BenchBroker>,
) -> anyhow::Result<Ctx> {
    let mut ctx = Ctx {
        agents: Vec::new(),
        by_home: vec![Vec::new(); hubs.len()],
        ..ctx.clone()
    };
    for i in 0..args.brokers {
        let home = i % hubs.len();
        let name = match transport {
            Transport::WebSocket => format!("bench-{run_id}-{i}"),
            Transport::Poll => format!("bench-{run_id}-poll-{i}"),
        };
        let created = ctx
            .call(
                home,
                "POST",
                "/v1/brokers",
                Some(json!({ "name": name })),
                201,
            )
            .await?;
        let broker_id = str_field(&created, "id")?;
        let secret = str_field(&created, "secret")?;
        let agent = ctx
            .call(
                home,
                "POST",
                "/v1/agents",
                Some(json!({ "name": format!("{name}-agent"), "broker_id": broker_id, "command": ["true"] })),
                201,
            )
            .await?;
        let broker = match transport {
            Transport::WebSocket => {
                BenchBroker::connect(hubs[home].addr(), &broker_id, &secret, ctx.acks.clone())
                    .await?
            }
            // A client of its own, as a separate broker process would have.
            Transport::Poll => {
                poll_broker::connect(
                    reqwest::Client::new(),
                    &ctx.bases[home],
                    &broker_id,
                    &secret,
                    ctx.acks.clone(),
                )
                .await?
            }
        };
        brokers.push(broker);
        ctx.by_home[home].push(ctx.agents.len());
        ctx.agents.push(BenchAgent {
            id: str_field(&agent, "id")?,
            home,
        });
    }
    Ok(ctx)
}

fn str_field(body: &Value, field: &str) -> anyhow::Result<String> {
    body[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("answer without {field}: {body}"))
}

impl Ctx {
    /// An authenticated call to replica `replica`; fails unless it answers
    /// `expect`.
    async fn call(
        &self,
        replica: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.parse()?, format!("{}{path}", self.bases[replica]))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if status != expect {
            bail!("{method} {path} answered {status} (expected {expect}): {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn scrape(&self) -> anyhow::Result<Scrape> {
        let mut scrape = Scrape::default();
        for base in &self.bases {
            let text = self
                .http
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            scrape.add_text(&text);
        }
        Ok(scrape)
    }
}

async fn wait_connected(ctx: &Ctx, hubs: &[RunningHub]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let replica_ids: Vec<String> = hubs.iter().map(|h| h.replica_id().to_string()).collect();
    loop {
        let mut ready = 0;
        for agent in &ctx.agents {
            let shown = ctx
                .call(0, "GET", &format!("/v1/agents/{}", agent.id), None, 200)
                .await?;
            let broker_id = str_field(&shown, "broker_id")?;
            let broker = ctx
                .call(0, "GET", &format!("/v1/brokers/{broker_id}"), None, 200)
                .await?;
            if broker["connected_replica"].as_str() == Some(replica_ids[agent.home].as_str()) {
                ready += 1;
            }
        }
        if ready == ctx.agents.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} bench brokers show as connected after 10 s",
                ctx.agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug)]
struct Line {
    n: usize,
    throughput: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    messages: bool,
    /// Messages per second until the hubs had recorded every one as
    /// delivered (message scenarios only).
    recorded_throughput: Option<f64>,
    elapsed: Duration,
    note: String,
}

fn line(n: usize, elapsed: Duration, mut samples: Vec<Duration>, messages: bool) -> Line {
    samples.sort_unstable();
    Line {
        n,
        throughput: n as f64 / elapsed.as_secs_f64(),
        p50: percentile_ms(&samples, 50.0),
        p90: percentile_ms(&samples, 90.0),
        p99: percentile_ms(&samples, 99.0),
        messages,
        elapsed,
        recorded_throughput: None,
        note: String::new(),
    }
}

/// One POST of the message scenario: which replica, and which agents.
fn plan(ctx: &Ctx, args: &BenchArgs, k: usize, cross: bool) -> (usize, Vec<usize>) {
    let n = ctx.bases.len();
    let home = k % n;
    let group = &ctx.by_home[home];
    let first = k * args.batch_size;
    let count = args.batch_size.min(args.messages - first);
    let agents = (0..count)
        .map(|m| group[(k / n * args.batch_size + m) % group.len()])
        .collect();
    let target = if cross { (home + 1) % n } else { home };
    (target, agents)
}

/// Sends one request; returns the message ids it created.
async fn post_messages(
    ctx: &Ctx,
    args: &BenchArgs,
    k: usize,
    target: usize,
    agents: &[usize],
) -> anyhow::Result<Vec<Uuid>> {
    let ids: anyhow::Result<Vec<Uuid>> = if args.batch_size == 1 {
        let agent = &ctx.agents[agents[0]];
        let answer = ctx
            .call(
                target,
                "POST",
                &format!("/v1/agents/{}/messages", agent.id),
                Some(json!({ "body": { "bench": k } })),
                202,
            )
            .await?;
        Ok(vec![str_field(&answer, "id")?.parse()?])
    } else {
        let messages: Vec<Value> = agents
            .iter()
            .enumerate()
            .map(|(m, a)| json!({ "agent": ctx.agents[*a].id, "body": { "bench": k, "m": m } }))
            .collect();
        let answer = ctx
            .call(
                target,
                "POST",
                "/v1/messages",
                Some(json!({ "messages": messages })),
                202,
            )
            .await?;
        let list = answer["messages"]
            .as_array()
            .with_context(|| format!("batch answer without messages: {answer}"))?;
        if list.len() != agents.len() {
            bail!(
                "batch of {} answered with {} messages",
                agents.len(),
                list.len()
            );
        }
        list.iter()
            .map(|m| Ok(str_field(m, "id")?.parse()?))
            .collect()
    };
    ids
}

async fn message_scenario(ctx: &Ctx, args: &BenchArgs, cross: bool) -> anyhow::Result<Line> {
    let requests = args.messages.div_ceil(args.batch_size);
    let before = ctx.scrape().await?;
    let start = Instant::now();
    let mut sent: Vec<(Uuid, Instant)> = Vec::with_capacity(args.messages);
    let mut note = String::new();
    let shared = Arc::new(ScenarioCtx {
        ctx: ctx.clone(),
        args: args.clone(),
    });
    match args.rate {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut workers = JoinSet::new();
            for _ in 0..args.concurrency.min(requests) {
                let next = next.clone();
                let shared = shared.clone();
                workers.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= requests {
                            return anyhow::Ok(mine);
                        }
                        let (target, agents) = plan(&shared.ctx, &shared.args, k, cross);
                        let t0 = Instant::now();
                        let ids =
                            post_messages(&shared.ctx, &shared.args, k, target, &agents).await?;
                        mine.extend(ids.into_iter().map(|id| (id, t0)));
                    }
                });
            }
            while let Some(joined) = workers.join_next().await {
                sent.extend(joined.context("load worker panicked")??);
            }
        }
        Some(rate) => {
            let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
            let mut tasks = JoinSet::new();
            let mut max_lag = Duration::ZERO;
            let mut saturated = 0usize;
            for k in 0..requests {
                let due = start + Duration::from_secs_f64((k * args.batch_size) as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        saturated += 1;
                        permits.clone().acquire_owned().await?
                    }
                };
                max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                let shared = shared.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let (target, agents) = plan(&shared.ctx, &shared.args, k, cross);
                    let t0 = Instant::now();
                    let ids = post_messages(&shared.ctx, &shared.args, k, target, &agents).await?;
                    anyhow::Ok(ids.into_iter().map(|id| (id, t0)).collect::<Vec<_>>())
                });
                while let Some(done) = tasks.try_join_next() {
                    sent.extend(done.context("load task panicked")??);
                }
            }
            while let Some(done) = tasks.join_next().await {
                sent.extend(done.context("load task panicked")??);
            }
            note = format!(
                " offered={rate:.0}/s max_send_lag={:.2}ms saturated_sends={saturated}",
                max_lag.as_secs_f64() * 1e3
            );
        }
    }
    let posted = start.elapsed();
    if sent.len() != args.messages {
        bail!("sent {} messages, expected {}", sent.len(), args.messages);
    }
    let first_send = sent.iter().map(|(_, t)| *t).min().unwrap_or(start);
    let mut pending = sent;
    let mut pairs = Vec::with_capacity(args.messages);
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        pairs.extend(ctx.acks.take_acked(&mut pending));
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} messages were not acked within {}s of the last POST (first missing: {})",
                pending.len(),
                args.messages,
                ACK_TIMEOUT.as_secs(),
                pending[0].0
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let last_ack = pairs.iter().map(|(_, a)| *a).max().unwrap_or(first_send);
    let samples: Vec<Duration> = pairs
        .iter()
        .map(|(s, a)| a.saturating_duration_since(*s))
        .collect();
    // The broker's ack ends a message's latency, but the hub records it as
    // delivered only once its ack UPDATE commits: wait for that too, so the
    // throughput of the whole path is reported, not just of sending.
    let recorded = loop {
        let delivered = ctx.scrape().await?.since(&before).messages_delivered;
        if delivered >= args.messages as f64 {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!(
                "only {delivered} of {} messages were recorded as delivered within {}s \
                 of the last POST",
                args.messages,
                ACK_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut out = line(
        args.messages,
        last_ack.saturating_duration_since(first_send),
        samples,
        true,
    );
    out.recorded_throughput =
        Some(args.messages as f64 / recorded.saturating_duration_since(first_send).as_secs_f64());
    out.note = format!("{note} posting_took={:.2}s", posted.as_secs_f64());
    Ok(out)
}

/// What a synchronous-call scenario times.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// `POST /v1/agents/{id}/restart`, answered with the agent running.
    Restart,
    /// `POST /v1/agents/{id}/ops/noop`: a named operation the bench broker
    /// answers with its arguments (the round trip of an operation).
    NoOp,
}

async fn lifecycle_scenario(
    ctx: &Ctx,
    args: &BenchArgs,
    cross: bool,
    call: Call,
) -> anyhow::Result<Line> {
    let ops = (args.messages / 20).max(50);
    let n = ctx.bases.len();
    let shared = Arc::new(ScenarioCtx {
        ctx: ctx.clone(),
        args: args.clone(),
    });
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    // One worker per agent: lifecycle ops on one agent are sequential.
    for a in 0..ctx.agents.len() {
        let next = next.clone();
        let shared = shared.clone();
        workers.spawn(async move {
            let agent = &shared.ctx.agents[a];
            let target = if cross {
                (agent.home + 1) % n
            } else {
                agent.home
            };
            let path = match call {
                Call::Restart => format!("/v1/agents/{}/restart", agent.id),
                Call::NoOp => format!("/v1/agents/{}/ops/noop", agent.id),
            };
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    break;
                }
                let t0 = Instant::now();
                if let Call::NoOp = call {
                    let args = serde_json::json!({ "i": i });
                    let body = serde_json::json!({ "args": args });
                    let answer = shared
                        .ctx
                        .call(target, "POST", &path, Some(body), 200)
                        .await?;
                    samples.push(t0.elapsed());
                    if answer["result"] != args {
                        bail!("noop answered {answer}, expected its arguments back");
                    }
                    continue;
                }
                let answer = shared.ctx.call(target, "POST", &path, None, 200).await?;
                samples.push(t0.elapsed());
                // The agent is the body (older hubs wrapped it in "agent").
                let phase = answer["phase"]
                    .as_str()
                    .or_else(|| answer["agent"]["phase"].as_str());
                if phase != Some("running") {
                    bail!("restart answered {answer}, expected the agent running");
                }
            }
            anyhow::Ok(samples)
        });
    }
    let mut samples = Vec::with_capacity(ops);
    while let Some(joined) = workers.join_next().await {
        samples.extend(joined.context("lifecycle worker panicked")??);
    }
    Ok(line(ops, start.elapsed(), samples, false))
}

/// What spawned load tasks share.
#[derive(Debug)]
struct ScenarioCtx {
    ctx: Ctx,
    args: BenchArgs,
}
