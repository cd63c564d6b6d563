#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: the request path allocates many small,
/// short-lived objects on two worker threads, where glibc malloc measured slower
/// (bench/README.md). The `system-allocator` feature keeps the system's, for heap profilers
/// that trace malloc (heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portcullis::main()
}
