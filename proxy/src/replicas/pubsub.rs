//! What replicas tell each other: revocations (every replica drops its copy) and pin changes,
//! followed by one subscription per replica that resubscribes after Redis failures.

use std::sync::Arc;
use std::time::Duration;

use portcullis_filters::stages::pinning::ToolPins;
use tokio_util::sync::CancellationToken;

use super::{RedisStore, StoreError};

impl RedisStore {
    /// Follow what other replicas publish until shutdown — revocations (dropped here with
    /// `on_revoke`) and pin changes (applied to `pins`) — resubscribing after Redis failures.
    pub fn spawn_listener<F>(
        self: &Arc<Self>,
        on_revoke: F,
        pins: Arc<ToolPins>,
        shutdown: CancellationToken,
    ) where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        let store = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let run = store.listen_once(&on_revoke, &pins);
                tokio::select! {
                    r = run => if let Err(e) = r {
                        tracing::debug!(error = %e, "redis subscription ended; resubscribing");
                    },
                    _ = shutdown.cancelled() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn listen_once<F>(&self, on_revoke: &F, pins: &ToolPins) -> Result<(), StoreError>
    where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()>,
    {
        use futures_util::StreamExt;
        let mut pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| StoreError("connect timed out".into()))?
            .map_err(|e| StoreError(e.to_string()))?;
        let (revoke, pin) = (self.revoke_channel(), self.pins_channel());
        pubsub
            .subscribe(&[&revoke, &pin])
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        // Pins changed while we were not listening.
        if let Ok(all) = self.load_pins().await {
            for (server, tool, hash) in all {
                pins.set_pinned(&server, &tool, &hash);
            }
        }
        tracing::debug!("listening for revocations and pin changes");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            if msg.get_channel_name() == revoke {
                on_revoke(payload).await;
            } else if let Ok((server, tool)) = serde_json::from_str::<(String, String)>(&payload) {
                let hash: Result<Option<String>, _> = self
                    .query(redis::cmd("HGET").arg(self.pins_key()).arg(&payload))
                    .await;
                if let Ok(Some(hash)) = hash {
                    pins.set_pinned(&server, &tool, &hash);
                }
            }
        }
        Err(StoreError("subscription closed".into()))
    }
}
