//! What replicas tell each other: credential revocations (every replica drops its copy), pin
//! changes and identity revocations, followed by one subscription per replica that
//! resubscribes after Redis failures.

use std::sync::Arc;
use std::time::Duration;

use portcullis_filters::stages::pinning::ToolPins;
use tokio_util::sync::CancellationToken;

use super::{RedisStore, StoreError};
use crate::edge::tls::Trust;

/// Where the listener applies what other replicas publish.
pub struct Followers<F> {
    /// Drops a credential's cached value (its name is the message).
    pub on_revoke: F,
    pub pins: Arc<ToolPins>,
    /// Identity revocations are reloaded into it.
    pub trust: Arc<Trust>,
    /// Approval changes are announced on it (held requests and consoles wait on it).
    pub approvals:
        Option<tokio::sync::broadcast::Sender<portcullis_filters::stages::approval::Change>>,
}

impl RedisStore {
    /// Follow what other replicas publish until shutdown, resubscribing after Redis failures.
    pub fn spawn_listener<F>(self: &Arc<Self>, to: Followers<F>, shutdown: CancellationToken)
    where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        let store = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let run = store.listen_once(&to);
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

    async fn listen_once<F>(&self, to: &Followers<F>) -> Result<(), StoreError>
    where
        F: Fn(String) -> futures_util::future::BoxFuture<'static, ()>,
    {
        use futures_util::StreamExt;
        let mut pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| StoreError("connect timed out".into()))?
            .map_err(|e| StoreError(e.to_string()))?;
        let (revoke, pin, identity, approvals) = (
            self.revoke_channel(),
            self.pins_channel(),
            self.identity_channel(),
            self.approvals_channel(),
        );
        pubsub
            .subscribe(&[&revoke, &pin, &identity, &approvals])
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        // Pins and revocations changed while we were not listening.
        if let Ok(all) = self.load_pins().await {
            for (server, tool, hash) in all {
                to.pins.set_pinned(&server, &tool, &hash);
            }
        }
        self.follow_revocations(&to.trust).await;
        tracing::debug!("listening for revocations and pin changes");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let channel = msg.get_channel_name();
            if channel == revoke {
                (to.on_revoke)(payload).await;
            } else if channel == identity {
                self.follow_revocations(&to.trust).await;
            } else if channel == approvals {
                if let (Some(tx), Some(change)) =
                    (&to.approvals, super::gates::parse_change(&payload))
                {
                    let _ = tx.send(change);
                }
            } else if let Ok((server, tool)) = serde_json::from_str::<(String, String)>(&payload) {
                let hash: Result<Option<String>, _> = self
                    .query(redis::cmd("HGET").arg(self.pins_key()).arg(&payload))
                    .await;
                if let Ok(Some(hash)) = hash {
                    to.pins.set_pinned(&server, &tool, &hash);
                }
            }
        }
        Err(StoreError("subscription closed".into()))
    }

    /// Serve the shared identity revocations (kept as they are if Redis cannot be read).
    pub async fn follow_revocations(&self, trust: &Trust) {
        match self.load_revocations().await {
            Ok(all) => {
                let n = all.len();
                if trust.set_revocations(all) {
                    tracing::info!(in_force = n, "identity revocations updated from redis");
                }
            }
            Err(e) => tracing::warn!(error = %e,
                "redis: cannot load the shared identity revocations; keeping the ones in force"),
        }
    }
}
