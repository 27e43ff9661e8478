//! The SDK's session logic against a tiny real WebSocket hub.
#![allow(clippy::unwrap_used, clippy::result_large_err)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{agent_file, dispatch, eventually, lines, spec};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use switchyard_broker::{BrokerConfig, BrokerError, ProcessConfig, ProcessRuntime, inbox_line};
use switchyard_proto::{
    AgentMessage, AgentStatus, BrokerFrame, CONNECT_PATH, Dispatch, DispatchResult, ErrorCode,
    ErrorFrame, HubFrame, MAX_MESSAGE_BYTES, Op, Phase, auth, decode, encode,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "s3cret-of-edge-1";
const BROKER: &str = "edge-1";
const LIMIT: Duration = Duration::from_secs(10);
const AGENT: &str =
    r#"echo x >> starts.txt; while IFS= read -r l; do printf '%s\n' "$l" >> got.txt; done"#;

type Ws = WebSocketStream<TcpStream>;

/// Accepts one upgrade, answering 401 if `reject`; returns the request headers.
async fn accept(listener: &TcpListener, reject: bool) -> (Option<Ws>, HeaderMap) {
    let (tcp, _) = tokio::time::timeout(LIMIT, listener.accept())
        .await
        .expect("the broker connects in time")
        .unwrap();
    let seen = Arc::new(Mutex::new(HeaderMap::new()));
    let seen_in = seen.clone();
    let callback = move |request: &Request, response: Response| {
        assert_eq!(request.uri().path(), CONNECT_PATH);
        *seen_in.lock().unwrap() = request.headers().clone();
        if reject {
            let mut refused = ErrorResponse::new(Some("bad credentials".to_owned()));
            *refused.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refused)
        } else {
            Ok(response)
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
        .await
        .ok();
    let headers = seen.lock().unwrap().clone();
    (ws, headers)
}

fn assert_signed(headers: &HeaderMap) {
    let get = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
    let nonce = get(auth::HEADER_NONCE);
    assert_eq!(nonce.len(), 32);
    assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(auth::nonce_is_valid(&nonce));
    let timestamp: i64 = get(auth::HEADER_TIMESTAMP).parse().unwrap();
    assert_eq!(get(auth::HEADER_BROKER), BROKER);
    assert!(auth::verify(
        &auth::secret_key(SECRET),
        BROKER,
        timestamp,
        &nonce,
        &get(auth::HEADER_SIGNATURE)
    ));
}

async fn recv(ws: &mut Ws) -> BrokerFrame {
    loop {
        let message = tokio::time::timeout(LIMIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = message {
            return decode(&text).unwrap();
        }
    }
}

/// The next frame that is not a status report.
async fn recv_reply(ws: &mut Ws) -> BrokerFrame {
    loop {
        match recv(ws).await {
            BrokerFrame::Status(_) => {}
            frame => return frame,
        }
    }
}

async fn send(ws: &mut Ws, frame: HubFrame) {
    ws.send(Message::text(encode(&frame))).await.unwrap();
}

/// Reads the hello, answers with a welcome; returns the hello's agents.
async fn handshake(ws: &mut Ws, heartbeat_ms: u64) -> Vec<AgentStatus> {
    let BrokerFrame::Hello { agents } = recv(ws).await else {
        panic!("the first frame must be hello");
    };
    send(
        ws,
        HubFrame::Welcome {
            session_id: Uuid::new_v4(),
            heartbeat_ms,
            max_message_bytes: MAX_MESSAGE_BYTES,
            poll: None,
        },
    )
    .await;
    agents
}

async fn result_of(ws: &mut Ws, d: &Dispatch) -> DispatchResult {
    result_and_statuses(ws, d).await.0
}

/// Sends a dispatch; returns its result and the statuses sent before it.
async fn result_and_statuses(ws: &mut Ws, d: &Dispatch) -> (DispatchResult, Vec<AgentStatus>) {
    send(ws, HubFrame::Dispatch(d.clone())).await;
    let mut statuses = Vec::new();
    loop {
        match recv(ws).await {
            BrokerFrame::Status(status) => statuses.push(status),
            BrokerFrame::Result(result) => {
                assert_eq!(result.dispatch_id, d.id);
                return (result, statuses);
            }
            other => panic!("expected a result, got {other:?}"),
        }
    }
}

/// Sends messages and collects acked ids until `expected` ids were acked.
async fn acks_for(ws: &mut Ws, messages: &[AgentMessage]) -> Vec<Uuid> {
    for m in messages {
        send(ws, HubFrame::Message(m.clone())).await;
    }
    let mut acked = Vec::new();
    while acked.len() < messages.len() {
        match recv_reply(ws).await {
            BrokerFrame::Ack { message_ids, .. } => acked.extend(message_ids),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    acked
}

struct Broker {
    runtime: ProcessRuntime,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BrokerError>>,
}

async fn start_broker(url: &str, workdir: &std::path::Path) -> Broker {
    let mut config = ProcessConfig::new(workdir);
    config.stop_grace = Duration::from_secs(2);
    let runtime = ProcessRuntime::new(config).await.unwrap();
    let shutdown = CancellationToken::new();
    let config = BrokerConfig {
        hubs: vec!["http://127.0.0.1:1".to_owned(), url.to_owned()],
        broker: BROKER.to_owned(),
        secret: SECRET.to_owned(),
        workdir: workdir.to_path_buf(),
        transport: switchyard_broker::Transport::Ws,
    };
    let task = tokio::spawn(switchyard_broker::run(
        config,
        Arc::new(runtime.clone()),
        shutdown.clone(),
    ));
    Broker {
        runtime,
        shutdown,
        task,
    }
}

impl Broker {
    /// Cancels, expects a 1000 close on `ws`, and stops the agents.
    async fn stop(self, ws: &mut Ws) {
        self.shutdown.cancel();
        loop {
            let message = tokio::time::timeout(LIMIT, ws.next())
                .await
                .expect("a close in time");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(frame.code, CloseCode::Normal);
                    break;
                }
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
        self.runtime.shutdown().await;
    }
}

fn message(agent_id: Uuid, seq: i64) -> AgentMessage {
    AgentMessage {
        id: Uuid::new_v4(),
        agent_id,
        seq,
        body: json!({ "seq": seq, "text": "hello \\ world" }),
        attachments: Vec::new(),
    }
}

#[tokio::test]
async fn dispatches_and_messages_are_effectively_once_across_reconnects_and_restarts() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let workdir = tempfile::tempdir().unwrap();
    let broker = start_broker(&url, workdir.path()).await;

    // A refused handshake is retried.
    let (refused, headers) = accept(&listener, true).await;
    assert!(refused.is_none());
    assert_signed(&headers);
    let (ws, headers) = accept(&listener, false).await;
    let mut ws = ws.unwrap();
    assert_signed(&headers);
    assert!(handshake(&mut ws, 10_000).await.is_empty());

    let agent_id = Uuid::new_v4();
    let spec = spec(AGENT);
    let start = dispatch(agent_id, Op::Start, &spec);
    let (started, statuses) = result_and_statuses(&mut ws, &start).await;
    assert!(started.ok);
    let phases: Vec<_> = statuses.iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        vec![Phase::Created, Phase::Starting, Phase::Running],
        "the statuses an op caused come before its result"
    );
    assert_eq!(started.result.as_ref().unwrap()["phase"], "running");
    let restart = dispatch(agent_id, Op::Restart, &spec);
    let restarted = result_of(&mut ws, &restart).await;
    assert!(restarted.ok);
    assert_ne!(restarted.result, started.result, "a new pid");
    // Redelivered: answered with the same outcome, not run again.
    assert_eq!(result_of(&mut ws, &restart).await, restarted);
    let starts = agent_file(workdir.path(), agent_id, "starts.txt");
    eventually("two starts", LIMIT, || async { lines(&starts).len() == 2 }).await;

    let messages: Vec<_> = (1..=3).map(|seq| message(agent_id, seq)).collect();
    let mut with_duplicate = messages.clone();
    with_duplicate.push(messages[0].clone());
    let mut acked = acks_for(&mut ws, &with_duplicate).await;
    acked.sort();
    let mut expected: Vec<_> = with_duplicate.iter().map(|m| m.id).collect();
    expected.sort();
    assert_eq!(acked, expected, "every copy is acknowledged");
    let in_order: Vec<_> = messages.iter().map(inbox_line).collect();
    let inbox = agent_file(workdir.path(), agent_id, "inbox.jsonl");
    assert_eq!(lines(&inbox), in_order, "appended once each, in order");
    let got = agent_file(workdir.path(), agent_id, "got.txt");
    eventually("stdin got every line", LIMIT, || async {
        lines(&got).len() == 3
    })
    .await;
    assert_eq!(lines(&got), in_order);

    // The hub drops the socket: the broker comes back with a new nonce and
    // its agents in hello, and still remembers the dispatch.
    drop(ws);
    let (ws, again) = accept(&listener, false).await;
    let mut ws = ws.unwrap();
    assert_signed(&again);
    assert_ne!(
        again.get(auth::HEADER_NONCE),
        headers.get(auth::HEADER_NONCE)
    );
    let agents = handshake(&mut ws, 10_000).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].phase, Phase::Running);
    assert_eq!(result_of(&mut ws, &restart).await, restarted);
    broker.stop(&mut ws).await;

    // A new broker process on the same workdir: the agent was running, so
    // it starts again (third start), but nothing already done is redone.
    let broker = start_broker(&url, workdir.path()).await;
    eventually("the agent restarted", LIMIT, || async {
        lines(&starts).len() == 3
    })
    .await;
    let (ws, _) = accept(&listener, false).await;
    let mut ws = ws.unwrap();
    let agents = handshake(&mut ws, 10_000).await;
    assert_eq!(agents[0].phase, Phase::Running);
    assert_eq!(result_of(&mut ws, &restart).await, restarted);
    assert_eq!(
        acks_for(&mut ws, &messages[1..2]).await,
        vec![messages[1].id]
    );
    assert_eq!(lines(&inbox), in_order);
    assert_eq!(lines(&starts).len(), 3);

    // A failed op is a failed result, remembered like any other.
    let bogus = dispatch(agent_id, Op::Start, &{
        let mut s = spec.clone();
        s.command.clear();
        s
    });
    let delete = dispatch(agent_id, Op::Delete, &spec);
    assert!(result_of(&mut ws, &delete).await.ok);
    let failed = result_of(&mut ws, &bogus).await;
    assert!(!failed.ok);
    assert!(failed.error.as_ref().unwrap().contains("deleted"));
    assert_eq!(result_of(&mut ws, &bogus).await, failed);
    broker.stop(&mut ws).await;
}

#[tokio::test]
async fn a_silent_hub_is_presumed_dead_and_the_broker_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let workdir = tempfile::tempdir().unwrap();
    let broker = start_broker(&url, workdir.path()).await;

    let (ws, _) = accept(&listener, false).await;
    let mut silent = ws.unwrap();
    handshake(&mut silent, 100).await;
    // Say nothing: after 3 x 100 ms the broker gives up on this socket.
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), accept(&listener, false))
        .await
        .expect("a reconnect after the silence");
    let mut ws = ws.unwrap();
    handshake(&mut ws, 10_000).await;
    drop(silent);
    broker.stop(&mut ws).await;
}

#[tokio::test]
async fn a_superseded_session_reconnects() {
    // The hub says "superseded" when the session it knew is gone from
    // storage (for example the replica was reaped as dead during a stall):
    // the broker must come back, not stop.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let workdir = tempfile::tempdir().unwrap();
    let broker = start_broker(&url, workdir.path()).await;
    let (ws, _) = accept(&listener, false).await;
    let mut old = ws.unwrap();
    handshake(&mut old, 10_000).await;
    send(
        &mut old,
        HubFrame::Error(ErrorFrame {
            code: ErrorCode::Superseded,
            message: "a newer session took over".to_owned(),
        }),
    )
    .await;
    let (ws, _) = tokio::time::timeout(LIMIT, accept(&listener, false))
        .await
        .expect("a reconnect after superseded");
    let mut ws = ws.unwrap();
    handshake(&mut ws, 10_000).await;
    drop(old);
    broker.stop(&mut ws).await;
}

/// Reads one HTTP request head from the listener and answers 404: the
/// hub saying a file is not (or no longer) there.
async fn refuse_one_fetch(listener: &TcpListener) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tcp, _) = tokio::time::timeout(LIMIT, listener.accept())
        .await
        .expect("the broker fetches in time")
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the fetch request ended early");
        head.extend_from_slice(&buf[..n]);
    }
    tcp.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&head).into_owned()
}

/// A message whose file cannot be fetched is not acked, ends the session,
/// and the message after it is not handed over before it: the next
/// session gets both again, in order.
#[tokio::test]
async fn a_message_whose_file_cannot_be_fetched_ends_the_session_and_nothing_overtakes_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let workdir = tempfile::tempdir().unwrap();
    let broker = start_broker(&url, workdir.path()).await;
    let (ws, _) = accept(&listener, false).await;
    let mut ws = ws.unwrap();
    handshake(&mut ws, 0).await;
    let agent = Uuid::new_v4();
    let first = AgentMessage {
        attachments: vec![switchyard_proto::AttachmentRef {
            id: Uuid::new_v4(),
            name: "report.txt".to_owned(),
            size: 3,
            sha256: "00".to_owned(),
        }],
        ..message(agent, 1)
    };
    let second = message(agent, 2);
    send(&mut ws, HubFrame::Message(first.clone())).await;
    send(&mut ws, HubFrame::Message(second.clone())).await;
    let head = refuse_one_fetch(&listener).await;
    assert!(
        head.starts_with(&format!(
            "GET /v1/brokers/attachments/{}",
            first.attachments[0].id
        )),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains(auth::HEADER_SIGNATURE),
        "signed"
    );
    // The session ends without acking either message.
    loop {
        match tokio::time::timeout(LIMIT, ws.next())
            .await
            .expect("the session ends")
        {
            Some(Ok(Message::Text(text))) => {
                if let Ok(BrokerFrame::Ack { message_ids, .. }) = decode::<BrokerFrame>(&text) {
                    panic!("acked {message_ids:?} although the first message failed");
                }
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
    }
    // The next session gets them again, in order (the file is there now:
    // this time the message comes without it).
    let (ws, _) = accept(&listener, false).await;
    let mut ws = ws.unwrap();
    handshake(&mut ws, 0).await;
    let again = AgentMessage {
        attachments: Vec::new(),
        ..first.clone()
    };
    let acked = acks_for(&mut ws, &[again, second.clone()]).await;
    assert_eq!(acked, vec![first.id, second.id]);
    let inbox = std::fs::read_to_string(
        switchyard_broker::agent_dir(workdir.path(), agent).join("inbox.jsonl"),
    )
    .unwrap();
    let ids: Vec<String> = inbox
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, vec![first.id.to_string(), second.id.to_string()]);
    broker.stop(&mut ws).await;
}
