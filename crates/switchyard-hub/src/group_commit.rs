//! Group commit for messages: concurrent API calls on one replica share
//! transactions.
//!
//! Each call queues its message with a reply channel; one task takes
//! everything waiting, writes it in one all-or-none batch, and answers each
//! caller after the commit. Under load many calls share one transaction
//! (one fsync, one round trip); an idle replica writes each call alone with
//! no added delay. If a shared batch fails (one bad item makes a batch
//! all-or-none), each item is retried alone, so one caller's bad input
//! never fails another caller's message.

use std::sync::Arc;

use switchyard_store::{Inserted, Message, NewMessage, Store, StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

/// Most messages written in one shared transaction.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<StoreResult<Inserted<Message>>>;

#[derive(Clone, Debug)]
pub(crate) struct MessageWriter {
    tx: mpsc::Sender<(NewMessage, Reply)>,
}

impl MessageWriter {
    /// Starts the writer task. It stops once every `MessageWriter` clone is
    /// gone, so calls still in flight during a graceful shutdown complete.
    pub(crate) fn start(store: Arc<dyn Store>) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        (Self { tx }, write_loop(store, rx))
    }

    /// Writes one message; returns once it is committed.
    pub(crate) async fn write(&self, message: NewMessage) -> StoreResult<Inserted<Message>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((message, reply))
            .await
            .map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }
}

async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(NewMessage, Reply)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let (messages, mut replies): (Vec<NewMessage>, Vec<Reply>) = group.drain(..).unzip();
        match store.insert_messages(messages.clone()).await {
            Ok(rows) => {
                for (row, reply) in rows.into_iter().zip(replies) {
                    let _ = reply.send(Ok(row));
                }
            }
            Err(err) if replies.len() == 1 => {
                if let Some(reply) = replies.pop() {
                    let _ = reply.send(Err(err));
                }
            }
            Err(_) => {
                for (message, reply) in messages.into_iter().zip(replies) {
                    let result = store
                        .insert_messages(vec![message])
                        .await
                        .map(|mut rows| rows.remove(0));
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// The writer is gone: the replica is stopping (answered as 503).
fn shutting_down() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}
