# syntax=docker/dockerfile:1
# Portcullis container image: `docker build -t portcullis .`
#
# Stages: `builder` compiles the release binary (dependencies in their own cached layer);
# `pki-init` is Debian slim + the binary + a shell, for one-shot init jobs (docker-compose.yml
# uses it to create the demo PKI); the last stage, the default target, is the runtime image:
# distroless (glibc, CA certificates, no shell, no package manager) + the binary, non-root.
#
# No HEALTHCHECK: the runtime image has no shell or HTTP client to run one. Probe the admin
# listener instead: GET /healthz (process up) and /readyz (listeners, certificates, bundles and
# policy loaded) on port 9901; Kubernetes httpGet probes do exactly that.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# 1. Dependencies only, from the manifests and the lockfile, so this layer is rebuilt only
#    when Cargo.toml/Cargo.lock change. Every workspace member needs its manifest and stub
#    targets for cargo to load the workspace; only `portcullis` (and what it uses) is built.
COPY Cargo.toml Cargo.lock ./
COPY proxy/Cargo.toml proxy/
COPY filters/Cargo.toml filters/
COPY policy/Cargo.toml policy/
COPY bench/Cargo.toml bench/
COPY tests/Cargo.toml tests/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    set -eu; \
    for c in proxy filters policy bench tests; do mkdir -p "$c/src"; : > "$c/src/lib.rs"; done; \
    echo 'fn main() {}' > proxy/src/main.rs; \
    echo 'fn main() {}' > bench/src/main.rs; \
    mkdir -p policy/benches; echo 'fn main() {}' > policy/benches/decision.rs; \
    cargo build --release --locked -p portcullis; \
    rm -rf proxy/src filters/src policy/src policy/benches

# 2. The real sources of the crates the binary is made of (bench/ and tests/ keep their stubs:
#    they are workspace members, not part of the binary). COPY keeps the files' old mtimes,
#    so touch them: cargo must see them as newer than the stub build.
COPY proxy proxy
COPY filters filters
COPY policy policy
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    set -eu; \
    find proxy filters policy -type f -exec touch {} +; \
    cargo build --release --locked -p portcullis; \
    mkdir -p /out; \
    cp target/release/portcullis /out/portcullis; \
    /out/portcullis --version

# One-shot init jobs (PKI creation in docker-compose.yml): the binary plus a POSIX shell.
FROM debian:bookworm-slim AS pki-init
COPY --from=builder /out/portcullis /usr/local/bin/portcullis
ENTRYPOINT ["/bin/sh"]

# Runtime: distroless cc (glibc, libgcc, CA certificates), user nonroot = 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="portcullis" \
      org.opencontainers.image.description="Egress forward proxy for AI-agent tool calls" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/portcullis /usr/local/bin/portcullis
USER 65532:65532
# glibc 2.36 (Debian 12) copies anything over ~2 KiB with `rep movsb`, which on AMD Zen 3/4 is
# several times slower than vector copies for some alignments (glibc bug 30994; 2.39 stopped
# using it there), and rustls copies every TLS record it seals: a quarter of the proxy's CPU
# in a large download on an EPYC host. Vector copies below 1 MiB instead (bench/README.md).
ENV GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1048576
# 8443: proxy listener (mTLS). 9901: admin (/healthz, /readyz, /metrics, revocation, MCP pins).
EXPOSE 8443 9901
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve", "--config", "/etc/portcullis/portcullis.yaml"]
