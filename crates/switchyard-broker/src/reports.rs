//! What a broker reports on its own, on either transport: its agents'
//! status changes, in the order the runtime made them, and always before
//! the result of the operation that caused them (the hub answers a caller
//! as of the result).

use std::sync::Arc;

use switchyard_proto::{AgentStatus, BrokerFrame};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::runtime::Runtime;

/// The runtime's status changes as frames to send.
pub(crate) struct StatusFeed {
    runtime: Arc<dyn Runtime>,
    feed: broadcast::Receiver<AgentStatus>,
    /// False once the runtime dropped its sender: no more changes come.
    open: bool,
}

impl StatusFeed {
    /// Subscribes now: changes from here on are reported. Subscribe before
    /// reading the statuses a `hello` carries, so none falls in between.
    pub(crate) fn subscribe(runtime: &Arc<dyn Runtime>) -> Self {
        Self {
            runtime: runtime.clone(),
            feed: runtime.subscribe(),
            open: true,
        }
    }

    /// The next change (waits; never returns once the runtime is gone).
    /// A feed that lagged resends every agent's status. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Vec<BrokerFrame> {
        loop {
            if !self.open {
                return std::future::pending().await;
            }
            let received = self.feed.recv().await;
            if let Some(frames) = self.frames(received.map_err(|e| match e {
                RecvError::Lagged(n) => Some(n),
                RecvError::Closed => None,
            })) {
                return frames;
            }
        }
    }

    /// The changes already made, without waiting: sent before a result.
    pub(crate) fn pending(&mut self) -> Vec<BrokerFrame> {
        let mut frames = Vec::new();
        while self.open {
            let received = match self.feed.try_recv() {
                Ok(status) => Ok(status),
                Err(TryRecvError::Lagged(n)) => Err(Some(n)),
                Err(TryRecvError::Closed) => Err(None),
                Err(TryRecvError::Empty) => break,
            };
            if let Some(more) = self.frames(received) {
                frames.extend(more);
            }
        }
        frames
    }

    /// `Err(Some(missed))`: lagged; `Err(None)`: closed.
    fn frames(&mut self, received: Result<AgentStatus, Option<u64>>) -> Option<Vec<BrokerFrame>> {
        match received {
            Ok(status) => Some(vec![BrokerFrame::Status(status)]),
            Err(Some(missed)) => {
                tracing::warn!(missed, "status feed lagged; resending every status");
                Some(
                    self.runtime
                        .statuses()
                        .into_iter()
                        .map(BrokerFrame::Status)
                        .collect(),
                )
            }
            Err(None) => {
                self.open = false;
                None
            }
        }
    }
}
