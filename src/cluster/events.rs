//! The event writer: events go through a bounded queue to one task that writes them in order,
//! retrying while Redis is away, so background tasks never wait on the network and events
//! survive short outages (a Sentinel failover included) in the order they were made.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::redis::{CoordError, Redis, Role};
use super::wire;
use crate::events::{Delivery, Event, EventSink};

/// Bounded so a Redis that never comes back cannot grow the daemon's memory without end.
const EVENT_QUEUE: usize = 4096;

enum Msg {
    Event(Event),
    /// Answered once every message before it is delivered.
    Flush(oneshot::Sender<()>),
}

async fn deliver(redis: &Redis, event: &Event) -> Result<(), CoordError> {
    match event.delivery() {
        Delivery::Anycast => redis
            .query::<String>(Role::Stream, &wire::anycast(event))
            .await
            .map(|_| ()),
        Delivery::Broadcast { cache_key } => {
            redis
                .pipe::<()>(Role::Stream, &wire::cached_broadcast(event, &cache_key))
                .await
        }
    }
}

pub struct RedisEvents {
    tx: mpsc::Sender<Msg>,
}

impl RedisEvents {
    pub fn start(redis: Arc<Redis>, shutdown: CancellationToken) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Msg>(EVENT_QUEUE);
        tokio::spawn(async move {
            let mut down = false;
            while let Some(msg) = rx.recv().await {
                let ev = match msg {
                    Msg::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                    Msg::Event(ev) => ev,
                };
                let mut delay = Duration::from_millis(200);
                loop {
                    match deliver(&redis, &ev).await {
                        Ok(()) => {
                            if down {
                                tracing::info!("Redis is back: delivering queued events");
                                down = false;
                            }
                            break;
                        }
                        Err(e) => {
                            if !down {
                                tracing::warn!(error = %e, "cannot publish events; queueing them");
                                down = true;
                            }
                            // After shutdown starts, keep trying until `flush`'s deadline:
                            // the process exits then anyway.
                            tokio::select! {
                                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                                _ = tokio::time::sleep(delay) => {}
                            }
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        });
        Arc::new(RedisEvents { tx })
    }
}

#[async_trait]
impl EventSink for RedisEvents {
    async fn publish(&self, event: Event) {
        if let Err(e) = self.tx.try_send(Msg::Event(event)) {
            tracing::warn!(error = %e, "event queue full; dropping an event");
        }
    }

    async fn flush(&self, within: Duration) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_err() {
            return;
        }
        if tokio::time::timeout(within, wait).await.is_err() {
            tracing::warn!("events still queued at exit (Redis unreachable?)");
        }
    }

    fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}
