//! A broker driven frame by frame by the test, over a real WebSocket.
//!
//! Unlike the broker SDK it has no behaviour of its own: it sends exactly
//! the frames the test sends and hands back every frame the hub sends (pings
//! skipped), so a test can break the protocol on purpose or stop answering.
//! Every helper panics instead of returning errors: a failure here is a
//! failed test, and the message says which step failed.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchyard_proto::auth::Handshake;
use switchyard_proto::{BrokerFrame, CONNECT_PATH, DispatchResult, HubFrame, decode, encode};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// The client side of one control channel.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the hub gets for each frame and for the closing handshake.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from the hub.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Opens the control channel of the hub at `base` (`http://host:port`) with
/// the given handshake. `Err(status)` if the hub refused the upgrade.
pub async fn upgrade(base: &str, handshake: &Handshake) -> Result<Socket, u16> {
    let url = format!("{}{CONNECT_PATH}", base.replacen("http://", "ws://", 1));
    let mut request = url
        .as_str()
        .into_client_request()
        .unwrap_or_else(|e| panic!("{url} is not a WebSocket URL: {e}"));
    let headers = request.headers_mut();
    for (name, value) in handshake.headers() {
        let value = HeaderValue::from_str(&value)
            .unwrap_or_else(|e| panic!("{name} cannot be sent as a header: {e}"));
        headers.insert(name, value);
    }
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES));
    match tokio_tungstenite::connect_async_with_config(request, Some(config), false).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("upgrade failed: {other}"),
    }
}

/// A broker session opened with hello (no agents) and welcomed.
#[derive(Debug)]
pub struct RawBroker {
    /// The socket, for tests that write raw messages or wait for the close.
    pub socket: Socket,
    /// The session id the hub's welcome named.
    pub session_id: Uuid,
}

impl RawBroker {
    /// Connects to the hub at `base`, says hello (no agents) and waits for
    /// welcome.
    pub async fn connect(base: &str, broker: &str, secret: &str) -> RawBroker {
        let mut socket = upgrade(base, &Handshake::new(broker, secret))
            .await
            .unwrap_or_else(|status| panic!("the hub refused the upgrade with {status}"));
        send(&mut socket, &BrokerFrame::Hello { agents: vec![] }).await;
        match recv(&mut socket).await {
            Some(HubFrame::Welcome { session_id, .. }) => RawBroker { socket, session_id },
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &BrokerFrame) {
        send(&mut self.socket, frame).await;
    }

    /// The next frame (pings skipped); None once the socket closed.
    pub async fn recv(&mut self) -> Option<HubFrame> {
        recv(&mut self.socket).await
    }

    /// Reads until the close frame and returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        close_code(&mut self.socket).await
    }

    /// Reports a dispatch as done, with no result.
    pub async fn done(&mut self, dispatch: Uuid) {
        let result = DispatchResult {
            dispatch_id: dispatch,
            ok: true,
            result: None,
            error: None,
            code: None,
        };
        self.send(&BrokerFrame::Result(result)).await;
    }

    /// Acks one message.
    pub async fn ack(&mut self, message: Uuid) {
        let ack = BrokerFrame::Ack {
            message_ids: vec![message],
            received: Vec::new(),
        };
        self.send(&ack).await;
    }
}

/// Sends one frame as a text message.
pub async fn send(socket: &mut Socket, frame: &BrokerFrame) {
    socket
        .send(Message::Text(encode(frame).into()))
        .await
        .unwrap_or_else(|e| panic!("sending {frame:?}: {e}"));
}

/// The next hub frame within 10 s, skipping pings; None when closed.
pub async fn recv(socket: &mut Socket) -> Option<HubFrame> {
    // One deadline for the whole wait: pings must not extend it.
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("a frame within 10 s");
        match next {
            Some(Ok(Message::Text(text))) => {
                return Some(
                    decode(&text).unwrap_or_else(|e| panic!("undecodable frame {text}: {e}")),
                );
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        }
    }
}

/// Reads until the close frame and returns its code.
pub async fn close_code(socket: &mut Socket) -> Option<u16> {
    loop {
        let next = tokio::time::timeout(FRAME_TIMEOUT, socket.next())
            .await
            .expect("the hub closes within 10 s");
        match next {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return None,
        }
    }
}
