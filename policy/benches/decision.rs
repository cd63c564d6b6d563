//! Decision latency of the example policy (and of allow-all) on realistic HTTP inputs,
//! from 1 thread and from 2 threads at once, plus the evaluation strategies compared
//! when choosing the per-thread VM. Run: `cargo bench -p portcullis-policy`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use portcullis_policy::{
    redact_headers, Destination, Identity, Input, Kind, Limits, PolicySet, RequestInfo, Source,
    Strategy, TimeInfo,
};

fn load(dir: &str) -> PolicySet {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(dir);
    PolicySet::load(&[path], "data.portcullis.decision", Limits::default()).unwrap()
}

/// 64 requests of one agent that differ the way consecutive requests do: trace id,
/// path and body size change; identity, destination and most headers repeat.
fn inputs() -> Vec<Input> {
    (0..64u64)
        .map(|i| {
            let traceparent = format!("00-{:032x}-{:016x}-01", i * 7919 + 1, i + 1);
            let length = (100 + i).to_string();
            let headers = [
                ("host", "api.github.com"),
                ("user-agent", "agent-runtime/1.4 python-httpx/0.27"),
                ("accept", "application/vnd.github+json"),
                ("content-type", "application/json"),
                ("content-length", length.as_str()),
                ("authorization", "Bearer pcx_github"),
                ("x-github-api-version", "2022-11-28"),
                ("traceparent", traceparent.as_str()),
            ];
            Input {
                kind: Kind::Http,
                identity: Identity::from_spiffe_id("spiffe://acme.test/agents/research").unwrap(),
                source: Some(Source {
                    address: "10.0.0.5".into(),
                    port: 51234,
                }),
                destination: Destination {
                    host: "api.github.com".into(),
                    port: 443,
                    scheme: "https".into(),
                },
                request: Some(RequestInfo {
                    method: "POST".into(),
                    path: format!("/repos/acme/widgets/issues/{i}/comments"),
                    normalized_path: format!("/repos/acme/widgets/issues/{i}/comments"),
                    query: BTreeMap::from([("per_page".into(), vec!["50".into()])]),
                    headers: redact_headers(headers.into_iter(), &[]),
                    body_size: Some(100 + i),
                }),
                mcp: None,
                credentials: vec!["github".into()],
                time: TimeInfo::at(1_763_726_400),
                gateway: None,
                approval: None,
                delegation: None,
            }
            .bounded(&portcullis_policy::InputLimits::default())
        })
        .collect()
}

/// Wall time for every one of `threads` threads to make `iters` decisions at once: the
/// per-iteration figure is the per-decision latency under that concurrency.
fn concurrent(
    set: &PolicySet,
    strategy: Strategy,
    inputs: &[Input],
    threads: usize,
    iters: u64,
) -> Duration {
    std::thread::scope(|scope| {
        let start = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    for i in 0..iters {
                        let input = &inputs[(i as usize + t * 17) % inputs.len()];
                        black_box(set.evaluate_with(black_box(input), strategy));
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let inputs = inputs();
    let example = load("policies");
    let allow_all = load("allow-all");
    let first = example.evaluate(&inputs[0]);
    assert!(first.allow, "{first:?}");
    assert_eq!(example.evaluator_name(), "rvm");

    let mut group = c.benchmark_group("decision");
    // `example` remembers decisions (the 64 inputs differ only in what the example policy
    // does not read: every decision after the first is recalled); `example_evaluated`
    // evaluates every one, as for inputs that differ in what the policy reads.
    for (name, set, strategy) in [
        ("example", &example, Strategy::PerThread),
        ("example_evaluated", &example, Strategy::PerThreadEvaluated),
        ("allow_all", &allow_all, Strategy::PerThread),
    ] {
        for threads in [1, 2] {
            group.bench_function(BenchmarkId::new(name, format!("{threads}-thread")), |b| {
                b.iter_custom(|iters| concurrent(set, strategy, &inputs, threads, iters));
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("strategy");
    for strategy in [
        Strategy::PerThread,
        Strategy::PerThreadEvaluated,
        Strategy::FreshPerEval,
        Strategy::InterpreterPerThread,
        Strategy::InterpreterClonePerEval,
    ] {
        group.bench_function(format!("{strategy:?}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % inputs.len();
                black_box(example.evaluate_with(black_box(&inputs[i]), strategy))
            });
        });
    }
    group.finish();
}

/// CPU time of each thread per decision (Linux `/proc`, 10 ms ticks, so runs are long).
/// Unlike wall time it does not grow when other processes take the cores, so on a busy
/// machine it is the figure that shows contention between our own threads.
fn cpu_report(set: &PolicySet, inputs: &[Input]) {
    fn ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }
    const DECISIONS: u64 = 300_000;
    for threads in [1, 2] {
        let per_thread: Vec<Option<f64>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || {
                        let start = ticks()?;
                        for i in 0..DECISIONS {
                            let input = &inputs[(i as usize + t * 17) % inputs.len()];
                            black_box(
                                set.evaluate_with(black_box(input), Strategy::PerThreadEvaluated),
                            );
                        }
                        // 100 ticks per second.
                        Some((ticks()? - start) as f64 * 10_000_000.0 / DECISIONS as f64)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let shown: Vec<String> = per_thread
            .iter()
            .map(|ns| ns.map_or("n/a".into(), |ns| format!("{:.2} µs", ns / 1000.0)))
            .collect();
        eprintln!(
            "decision/example/{threads}-thread cpu per decision: {}",
            shown.join(", ")
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    cpu_report(&load("policies"), &inputs());
}
