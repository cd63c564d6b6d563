//! How many bytes of request bodies the proxy holds for inspection at once: bounded for the
//! whole process (`limits.buffered_body_bytes`) and per client connection
//! (`limits.buffered_body_bytes_per_connection`: 200 h2 streams × 1 MiB would otherwise be
//! one client's to take). A body's bytes are reserved as they arrive and released when its
//! action has its answer; a reservation that does not fit is refused at once (503
//! `overloaded` for the process, 429 for the connection), never queued.

use std::sync::Arc;

use portcullis_filters::{ErrorCode, Rejection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations count in KiB (a semaphore's permits are a `u32`).
const UNIT: usize = 1024;

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

/// A byte budget: the process's, or one connection's.
#[derive(Debug, Clone)]
pub struct Budget(Arc<Semaphore>, usize);

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let total = units(bytes).min(Semaphore::MAX_PERMITS);
        Budget(Arc::new(Semaphore::new(total)), total)
    }

    /// The bytes reserved now (in whole KiB).
    pub fn held_bytes(&self) -> usize {
        (self.1 - self.0.available_permits()) * UNIT
    }
}

/// What one body holds of both budgets; dropped, it gives them back.
#[derive(Debug, Default)]
pub struct Held {
    units: usize,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Held {
    /// Grow the reservation to cover `bytes` in total, from both budgets.
    pub fn cover(
        &mut self,
        bytes: usize,
        process: &Budget,
        conn: &Budget,
    ) -> Result<(), Rejection> {
        let more = units(bytes).saturating_sub(self.units);
        if more == 0 {
            return Ok(());
        }
        let n = u32::try_from(more).unwrap_or(u32::MAX);
        let from_conn = conn.0.clone().try_acquire_many_owned(n).map_err(|_| {
            let mut r = Rejection::new(
                ErrorCode::Overloaded,
                "this connection's buffered request bodies are at limits.buffered_body_bytes_per_connection: retry when its other requests are done",
            );
            r.status = Some(429);
            r
        })?;
        let from_process = process.0.clone().try_acquire_many_owned(n).map_err(|_| {
            Rejection::new(
                ErrorCode::Overloaded,
                "the proxy's buffered request bodies are at limits.buffered_body_bytes: retry later",
            )
        })?;
        self.permits.extend([from_conn, from_process]);
        self.units += more;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_per_connection_and_per_process_and_given_back() {
        let process = Budget::new(10 * UNIT);
        let (a, b) = (Budget::new(6 * UNIT), Budget::new(6 * UNIT));
        let mut one = Held::default();
        one.cover(3 * UNIT, &process, &a).unwrap();
        one.cover(6 * UNIT - 10, &process, &a).unwrap();
        let over = one.cover(6 * UNIT + 1, &process, &a).unwrap_err();
        assert_eq!((over.code, over.status()), (ErrorCode::Overloaded, 429));
        let mut two = Held::default();
        two.cover(4 * UNIT, &process, &b).unwrap();
        let full = two.cover(5 * UNIT, &process, &b).unwrap_err();
        assert_eq!((full.code, full.status()), (ErrorCode::Overloaded, 503));
        drop(one);
        two.cover(5 * UNIT, &process, &b).unwrap();
    }
}
