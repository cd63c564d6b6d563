//! Connection slots (`limits.max_connections`, the connector's `--max-connections`): a listener
//! takes a slot before it accepts, so at the limit new clients wait in the kernel's backlog
//! instead of costing the process anything. When no slot is free the caller is told, so the
//! limit is observable (a gauge, a log line) rather than inferred from timing.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub struct Slots(Arc<Semaphore>);

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots(Arc::new(Semaphore::new(n)))
    }

    /// The next free slot; `full` runs first when none is free and the caller must wait.
    /// `None` only if the slots were closed.
    pub async fn take(&self, full: impl FnOnce()) -> Option<OwnedSemaphorePermit> {
        match self.0.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(TryAcquireError::Closed) => None,
            Err(TryAcquireError::NoPermits) => {
                full();
                self.0.clone().acquire_owned().await.ok()
            }
        }
    }
}
