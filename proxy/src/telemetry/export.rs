//! The export side: encoded spans wait in a bounded queue (a full queue drops whole actions
//! and counts them) and one task sends them in batches to the collector, one export at a
//! time, each bounded; a failed batch is counted as dropped, never retried.

use super::*;
use crate::telemetry::otlp::ExportError;

/// What happened to the spans handed to the exporter, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans accepted by the collector.
    pub exported: AtomicU64,
    /// Spans lost: the queue was full, or their export failed or timed out.
    pub dropped: AtomicU64,
    /// Export calls (batches) that failed or timed out.
    pub export_errors: AtomicU64,
}

/// Encoded spans waiting for export, and where each action's spans end: a batch is cut
/// between actions.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) bytes: Vec<u8>,
    /// Per queued action: its end offset in `bytes` and the spans queued up to there.
    pub(super) marks: Vec<(usize, usize)>,
}

impl Pending {
    pub(super) fn spans(&self) -> usize {
        self.marks.last().map_or(0, |m| m.1)
    }
}

/// The spans waiting for export: bounded in spans, and the export task is woken only when a
/// batch is full (a wake-up per span cost more than encoding the span).
pub(super) struct Queue {
    pub(super) pending: std::sync::Mutex<Pending>,
    pub(super) capacity: usize,
    pub(super) batch: usize,
    pub(super) full: Notify,
}

impl Queue {
    pub(super) fn new(cfg: &Batching) -> Queue {
        Queue {
            pending: std::sync::Mutex::default(),
            capacity: cfg.queue,
            batch: cfg.batch,
            full: Notify::new(),
        }
    }

    /// One action's encoded spans; false when they do not fit (they are dropped).
    pub(super) fn push(&self, encoded: &[u8], spans: usize) -> bool {
        let Ok(mut q) = self.pending.lock() else {
            return false;
        };
        let before = q.spans();
        if before + spans > self.capacity {
            return false;
        }
        q.bytes.extend_from_slice(encoded);
        let end = q.bytes.len();
        q.marks.push((end, before + spans));
        drop(q);
        if before < self.batch && before + spans >= self.batch {
            self.full.notify_one();
        }
        true
    }

    /// Up to one batch of whole actions, oldest first, with its span count; only a full
    /// batch unless `partial`.
    pub(super) fn take(&self, partial: bool) -> Option<(Vec<u8>, usize)> {
        let mut q = self.pending.lock().ok()?;
        let total = q.spans();
        if total == 0 || (total < self.batch && !partial) {
            return None;
        }
        if total <= self.batch {
            q.marks.clear();
            return Some((std::mem::take(&mut q.bytes), total));
        }
        // The last action that still fits; the first always goes.
        let cut = q.marks.iter().rposition(|m| m.1 <= self.batch).unwrap_or(0);
        let (end, n) = q.marks[cut];
        let bytes = q.bytes.drain(..end).collect();
        q.marks.drain(..=cut);
        for m in &mut q.marks {
            m.0 -= end;
            m.1 -= n;
        }
        Some((bytes, n))
    }
}

/// The batch settings, from the standard `OTEL_BSP_*` variables (OpenTelemetry's defaults).
#[derive(Debug, Clone, Copy)]
pub(super) struct Batching {
    pub(super) queue: usize,
    pub(super) batch: usize,
    pub(super) delay: Duration,
    /// Per export call: the smaller of `OTEL_BSP_EXPORT_TIMEOUT` (30 s) and
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (10 s).
    pub(super) timeout: Duration,
}

impl Batching {
    pub(super) fn from_env() -> Batching {
        let num = |name: &str, default: u64| {
            env(name)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let queue = usize::try_from(num("OTEL_BSP_MAX_QUEUE_SIZE", 2048)).unwrap_or(2048);
        let batch = usize::try_from(num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)).unwrap_or(512);
        let otlp = otlp::timeout_from(
            env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .as_deref(),
            Duration::from_secs(10),
        );
        Batching {
            queue,
            batch: batch.min(queue),
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            timeout: Duration::from_millis(num("OTEL_BSP_EXPORT_TIMEOUT", 30_000)).min(otlp),
        }
    }
}

/// The export side: queue, counters, and the task that drains the queue.
pub(super) struct Export {
    pub(super) queue: Arc<Queue>,
    pub(super) stats: Arc<ExportStats>,
    pub(super) shutdown: std::sync::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
}

/// What the export task sends with.
pub(super) struct Sender {
    pub(super) transport: Transport,
    pub(super) envelope: Envelope,
}

/// The export task: batches of up to `batch` spans, sent when one is full or every `delay`,
/// one export at a time, each bounded by `timeout`. Spans of a failed batch are counted as
/// dropped (no retry: the queue behind it would only grow).
pub(super) async fn export_loop(
    sender: Sender,
    queue: Arc<Queue>,
    cfg: Batching,
    stats: Arc<ExportStats>,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let mut tick = tokio::time::interval(cfg.delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let (partial, done) = tokio::select! {
            _ = queue.full.notified() => (false, None),
            _ = tick.tick() => (true, None),
            done = &mut stop => (true, Some(done)),
        };
        // The full batches (spans keep arriving while one is exported), and on the timer or
        // at shutdown what is left too.
        while let Some((spans, n)) = queue.take(partial) {
            let result =
                tokio::time::timeout(cfg.timeout, sender.transport.send(&sender.envelope, &spans))
                    .await
                    .unwrap_or(Err(ExportError::Timeout(cfg.timeout)));
            count(result, n as u64, &stats, &mut failing);
        }
        if let Some(done) = done {
            if let Ok(done) = done {
                let _ = done.send(());
            }
            return;
        }
    }
}

pub(super) fn count(
    result: Result<(), ExportError>,
    n: u64,
    stats: &ExportStats,
    failing: &mut bool,
) {
    match result {
        Ok(()) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
            if std::mem::take(failing) {
                tracing::info!("span export works again");
            }
        }
        Err(e) => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            stats.export_errors.fetch_add(1, Ordering::Relaxed);
            // Once per outage, not per batch.
            if !std::mem::replace(failing, true) {
                tracing::warn!(error = %e, spans = n, "span export failed; dropping spans until the collector answers (counted in portcullis_otel_spans_dropped_total)");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    use std::sync::atomic::AtomicBool;

    pub(super) fn batching(queue: usize, batch: usize) -> Batching {
        Batching {
            queue,
            batch,
            delay: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        }
    }

    /// `n` encoded spans named after `tag`, as one action.
    pub(super) fn action(tag: &str, n: usize) -> Vec<u8> {
        let mut enc = Encoder::default();
        for i in 0..n {
            enc.span(
                &SpanHead {
                    trace_id: [1; 16],
                    span_id: [u8::try_from(i + 1).unwrap(); 8],
                    parent: None,
                    parent_is_remote: false,
                    kind: Kind::Server,
                    name: tag,
                    start: 1,
                    end: 2,
                    error: None,
                },
                |a| a.str("k", "v"),
            );
        }
        enc.out
    }

    pub(super) fn names(body: &[u8]) -> Vec<String> {
        let req = ExportTraceServiceRequest::decode(body).unwrap();
        req.resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .map(|s| s.name)
            .collect()
    }

    #[test]
    pub(super) fn a_full_queue_drops_whole_actions() {
        let q = Queue::new(&batching(5, 5));
        assert!(q.push(&action("a", 3), 3));
        assert!(!q.push(&action("b", 3), 3), "would exceed 5 spans");
        assert!(q.push(&action("c", 2), 2));
        assert!(!q.push(&action("d", 1), 1));
        let (bytes, n) = q.take(false).unwrap();
        assert_eq!(n, 5);
        let env = Envelope::new(&[], "t", "0");
        assert_eq!(names(&env.request(&bytes, 0)), ["a", "a", "a", "c", "c"]);
        assert!(q.take(true).is_none());
    }

    #[test]
    pub(super) fn batches_are_cut_between_actions() {
        let q = Queue::new(&batching(100, 4));
        for tag in ["a", "b", "c", "d"] {
            q.push(&action(tag, 3), 3);
        }
        let env = Envelope::new(&[], "t", "0");
        // 12 spans queued, batches of at most 4: whole actions only, one per batch here.
        let (first, n) = q.take(false).unwrap();
        assert_eq!(
            (n, names(&env.request(&first, 0))),
            (3, vec!["a".to_owned(); 3])
        );
        let (second, n) = q.take(false).unwrap();
        assert_eq!(
            (n, names(&env.request(&second, 0))),
            (3, vec!["b".to_owned(); 3])
        );
        // 6 left: still a full batch's worth.
        assert!(q.take(false).is_some());
        // 3 left: only on the timer.
        assert!(q.take(false).is_none());
        let (last, n) = q.take(true).unwrap();
        assert_eq!(
            (n, names(&env.request(&last, 0))),
            (3, vec!["d".to_owned(); 3])
        );
    }

    /// An OTLP/HTTP collector that answers 503 while `down`, else decodes and counts spans,
    /// and remembers the `x-api-key` it was sent.
    pub(super) async fn collector(
        down: Arc<AtomicBool>,
        got: Arc<AtomicU64>,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (down, got) = (down.clone(), got.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (down, got) = (down.clone(), got.clone());
                            async move {
                                let key_ok =
                                    req.headers().get("x-api-key").is_some_and(|v| v == "k=1");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let status = if down.load(Ordering::SeqCst) || !key_ok {
                                    503
                                } else {
                                    got.fetch_add(names(&body).len() as u64, Ordering::SeqCst);
                                    200
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(bytes::Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    pub(super) async fn failed_exports_are_counted_then_delivery_resumes() {
        let (down, got) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let addr = collector(down.clone(), got.clone()).await;
        let tls =
            crate::upstream::client_tls_config(&UpstreamConfig::default(), Vec::new()).unwrap();
        let transport = Transport::new(
            OtlpProtocol::HttpProtobuf,
            &OtlpEndpoint::try_from(format!("http://{addr}")).unwrap(),
            otlp::parse_headers("x-api-key=k%3D1").unwrap(),
            tls,
        )
        .unwrap();
        let stats = Arc::new(ExportStats::default());
        let cfg = batching(16, 4);
        let queue = Arc::new(Queue::new(&cfg));
        let (stop_tx, stop_rx) = oneshot::channel();
        let sender = Sender {
            transport,
            envelope: Envelope::new(&[("service.name", "t")], "t", "0"),
        };
        let task = tokio::spawn(export_loop(
            sender,
            queue.clone(),
            cfg,
            stats.clone(),
            stop_rx,
        ));
        assert!(queue.push(&action("a", 4), 4));
        let mut waited = 0;
        while stats.dropped.load(Ordering::SeqCst) < 4 {
            assert!(waited < 500, "the failed batch was never counted");
            waited += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stats.export_errors.load(Ordering::SeqCst) >= 1);
        down.store(false, Ordering::SeqCst);
        assert!(queue.push(&action("b", 3), 3));
        // Shutdown flushes what is queued.
        let (done_tx, done_rx) = oneshot::channel();
        stop_tx.send(done_tx).unwrap();
        done_rx.await.unwrap();
        task.await.unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 3);
        assert_eq!(stats.exported.load(Ordering::SeqCst), 3);
        assert_eq!(stats.dropped.load(Ordering::SeqCst), 4);
    }
}
