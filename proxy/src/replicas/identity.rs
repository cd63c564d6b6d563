//! Identity revocations shared by replicas: a Redis hash of selector → record (persisted with
//! Redis), and a channel on which every change is announced; each replica then reloads the
//! whole hash, so a missed message is made good by the next one or by the resubscription.

use crate::edge::revocation::{Record, Revocations, Selector};

use super::{RedisStore, StoreError};

impl RedisStore {
    pub(super) fn identity_key(&self) -> String {
        format!("{}:identity:revoked", self.prefix)
    }

    pub(super) fn identity_channel(&self) -> String {
        format!("{}:identity", self.prefix)
    }

    /// Every shared revocation.
    pub async fn load_revocations(&self) -> Result<Revocations, StoreError> {
        let all: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(self.identity_key()))
            .await?;
        let records = all.into_iter().filter_map(|(selector, json)| {
            let record = serde_json::from_str::<Record>(&json).ok();
            if record.is_none() {
                tracing::warn!(%selector, "redis: skipping an unreadable identity revocation");
            }
            record
        });
        Ok(Revocations::from_records(records))
    }

    /// Store a revocation and tell the other replicas.
    pub async fn share_revocation(&self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(|e| StoreError(e.to_string()))?;
        self.query::<i64>(
            redis::cmd("HSET")
                .arg(self.identity_key())
                .arg(&record.selector)
                .arg(json),
        )
        .await?;
        self.announce_identity(&record.selector).await
    }

    /// Lift a revocation everywhere.
    pub async fn share_restore(&self, selector: &Selector) -> Result<(), StoreError> {
        let key = selector.key();
        self.query::<i64>(redis::cmd("HDEL").arg(self.identity_key()).arg(&key))
            .await?;
        self.announce_identity(&key).await
    }

    async fn announce_identity(&self, selector: &str) -> Result<(), StoreError> {
        self.query::<i64>(
            redis::cmd("PUBLISH")
                .arg(self.identity_channel())
                .arg(selector),
        )
        .await
        .map(drop)
    }
}
