#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: the request path allocates many small,
/// short-lived objects on two worker threads, where glibc malloc measured slower
/// (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portcullis::main()
}
