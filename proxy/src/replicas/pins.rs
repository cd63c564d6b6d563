//! MCP tool pins shared by replicas: a Redis hash of (server, tool) → definition hash, first
//! sights offered with `HSETNX` (the first replica's pin wins), acceptances overwrite, and
//! every change is published so the other replicas apply it.

use std::sync::Arc;

use portcullis_filters::stages::pinning::{PinEvent, ToolPins};

use super::{RedisStore, StoreError};

impl RedisStore {
    pub(super) fn pins_key(&self) -> String {
        format!("{}:pins", self.prefix)
    }

    pub(super) fn pins_channel(&self) -> String {
        format!("{}:pins", self.prefix)
    }

    /// Every shared tool pin: (server, tool, hash).
    pub async fn load_pins(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let all: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(self.pins_key()))
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|(field, hash)| {
                let (server, tool) = serde_json::from_str::<(String, String)>(&field).ok()?;
                Some((server, tool, hash))
            })
            .collect())
    }

    /// Offer this replica's first sight as the shared pin; returns the shared pin (ours, or
    /// the one another replica set first).
    pub async fn pin_first_sight(&self, server: &str, tool: &str, hash: &str) -> Option<String> {
        let field = serde_json::json!([server, tool]).to_string();
        let created: i64 = self
            .query(
                redis::cmd("HSETNX")
                    .arg(self.pins_key())
                    .arg(&field)
                    .arg(hash),
            )
            .await
            .ok()?;
        if created == 1 {
            self.publish_pin(&field).await;
            return Some(hash.to_owned());
        }
        self.query(redis::cmd("HGET").arg(self.pins_key()).arg(&field))
            .await
            .ok()
    }

    /// An operator accepted a new definition here: it becomes the shared pin.
    pub async fn pin_accept(&self, server: &str, tool: &str, hash: &str) {
        let field = serde_json::json!([server, tool]).to_string();
        let set = self
            .query::<i64>(
                redis::cmd("HSET")
                    .arg(self.pins_key())
                    .arg(&field)
                    .arg(hash),
            )
            .await;
        if set.is_ok() {
            self.publish_pin(&field).await;
        }
    }

    async fn publish_pin(&self, field: &str) {
        let _ = self
            .query::<i64>(redis::cmd("PUBLISH").arg(self.pins_channel()).arg(field))
            .await;
    }
}

/// Report this replica's pin events to the shared store (and apply its answer).
pub fn share_pins(store: &Arc<RedisStore>, pins: &Arc<ToolPins>) {
    let (store, weak) = (store.clone(), Arc::downgrade(pins));
    pins.set_hook(Arc::new(move |event| {
        let (store, weak) = (store.clone(), weak.clone());
        tokio::spawn(async move {
            match event {
                PinEvent::FirstSight { server, tool, hash } => {
                    let shared = store.pin_first_sight(&server, &tool, &hash).await;
                    if let (Some(shared), Some(pins)) = (shared, weak.upgrade()) {
                        pins.set_pinned(&server, &tool, &shared);
                    }
                }
                PinEvent::Accepted { server, tool, hash } => {
                    store.pin_accept(&server, &tool, &hash).await;
                }
            }
        });
    }));
}
