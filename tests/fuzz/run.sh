#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target of tests/fuzz once, then runs each for
# SECONDS (default 10), failing on any crash, leak, timeout or out-of-memory. Prints, per
# target, libFuzzer's final "#N DONE cov: X ft: Y" line (executions, coverage, features).
#
#   bash tests/fuzz/run.sh [SECONDS]
#
# Works on the stable toolchain: targets are built without a sanitizer (`-s none`: the
# project has no `unsafe`), which needs no `-Z` flag; RUSTC_BOOTSTRAP=1 is set anyway so the
# same command works if a newer cargo-fuzz passes one. Needs only rustup's stable toolchain
# and a C++ compiler (libFuzzer is C++), installed here with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")"

SECS="${1:-10}"
CARGO_FUZZ_VERSION=0.13.2

sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v c++ >/dev/null 2>&1; then
  echo "==> installing g++ (libFuzzer is C++)"
  sudo_cmd apt-get update -qq
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi
if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "==> cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)
opts=(--fuzz-dir . -s none)
# PORTCULLIS_FUZZ_DEV=1: unoptimized builds (CI's smoke: a cold build in about 4 minutes
# instead of a release build of every dependency; far fewer executions per second).
if [ "${PORTCULLIS_FUZZ_DEV:-0}" = 1 ]; then
  opts+=(--dev)
fi

echo "==> cargo fuzz build"
start=$(date +%s)
"${fuzz[@]}" build "${opts[@]}"
echo "built in $(( $(date +%s) - start ))s"

mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir .)
mkdir -p target/fuzz-logs
failed=()
for t in "${targets[@]}"; do
  # New inputs go to a scratch corpus under target/; corpus/<t> (the seeds) is only read.
  mkdir -p "target/corpus/$t" "corpus/$t"
  log="target/fuzz-logs/$t.log"
  if "${fuzz[@]}" run "${opts[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
      -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
  fi
  done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)"
  printf '%-26s %-6s %s\n' "$t" "$status" "${done_line:-(no DONE line)}"
  if [ "$status" = FAILED ]; then
    echo "---- $log (last 40 lines)"
    tail -n 40 "$log"
    echo "----"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "==> fuzz targets failed: ${failed[*]} (reproducers under tests/fuzz/artifacts/)"
  exit 1
fi
echo "==> all ${#targets[@]} fuzz targets ran ${SECS}s each without a finding"
