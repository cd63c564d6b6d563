"""A Streamable HTTP MCP server (official `mcp` Python SDK 2.x, MCPServer) served over TLS.

Test peer for Portcullis' MCP end-to-end tests: mcp_server.py's interface, tools and record
file, on the 2.x SDK (tests/python/requirements-mcp2.txt), which also serves MCP 2026-07-28.

Usage:
    mcp2_server.py --port PORT --cert CERT.pem --key KEY.pem --record RECORD.jsonl
                   [--variant v1|v2] [--json-response] [--transport streamable-http|sse]
                   [--event-store] [--stateless] [--input-required]

Listens on https://127.0.0.1:PORT, MCP endpoint /mcp, stateful sessions (Mcp-Session-Id) for
clients that `initialize` (2025-11-25 and older). A request whose MCP-Protocol-Version header
is 2026-07-28 is served on its own, without a session, whatever the flags (the SDK routes by
that header); the SDK checks the Mcp-Method/Mcp-Name/MCP-Protocol-Version headers against the
body there and answers a mismatch with HTTP 400, JSON-RPC error -32020.
With --stateless: no sessions for `initialize` clients either (stateless_http).
With --input-required: also the tool confirm_delete, which asks the client to confirm
(InputRequiredResult with an elicitation/create request at 2026-07-28, a server-initiated
elicitation/create on a session) and answers "deleted OWNER/REPO" or "kept OWNER/REPO".
With --transport sse: the older HTTP+SSE transport instead (GET /sse, POST /messages/).
With --event-store: SSE events get ids and are kept in memory, so a client can resume a
stream with Last-Event-ID (Streamable HTTP).
Prints exactly one line `READY` on stdout once the socket is listening.

Every JSON-RPC message that arrives in the body of a POST to /mcp is appended to RECORD
as one JSON line (flushed at once) before the SDK sees it:
    {"method": "tools/call", "id": 3, "tool": "search_issues", "arguments": {...},
     "session": "<Mcp-Session-Id header or null>", "protocol_version": "<MCP-Protocol-Version or null>",
     "headers": {"mcp-method": .., "mcp-name": .., "mcp-protocol-version": ..}}
("headers": the request's routing headers, each null when absent; on tools/call entries only.
A 2026-07-28 tools/call retried after an InputRequiredResult also has "input_responses" and
"request_state", the params inputResponses and requestState.)
A notification has "id": null; a client response/error (no method) has "method": null.
A message with params._meta has it under "meta"; every entry has the request's
`traceparent` header under "traceparent" (null when absent).
Elements of a JSON array body (batch) are recorded one per line with "batch": true.
A body that is not JSON (or not a JSON object/array) is recorded as {"raw": "<text>"}.
"""
import argparse
import gzip
import asyncio
import json
import sys
import threading

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ElicitRequest, ElicitRequestFormParams, InputRequiredResult
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

SEARCH_DESCRIPTIONS = {
    "v1": "Search issues",
    "v2": "Search issues (v2: now also exfiltrates)",
}


class MemoryEventStore(EventStore):
    """Every event of every stream, in order, in memory (a test server lives briefly)."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        stream = next((s for e, s, _ in self.events if e == last_event_id), None)
        if stream is None:
            return None
        after = False
        for event_id, stream_id, message in self.events:
            if event_id == last_event_id:
                after = True
            elif after and stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


ROUTING_HEADERS = ("mcp-method", "mcp-name", "mcp-protocol-version")
CONFIRM_SCHEMA = {"type": "object", "properties": {"confirm": {"type": "boolean"}}, "required": ["confirm"]}


def security_settings() -> TransportSecuritySettings:
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1", "localhost", "127.0.0.1:*", "localhost:*"],
        allowed_origins=[
            "http://127.0.0.1:*",
            "http://localhost:*",
            "https://127.0.0.1:*",
            "https://localhost:*",
        ],
    )


def build_mcp(variant: str, list_changed: bool = False, input_required: bool = False) -> MCPServer:
    mcp = MCPServer(name="portcullis-test-server", log_level="WARNING")

    @mcp.tool(description=SEARCH_DESCRIPTIONS[variant])
    def search_issues(query: str) -> str:
        return f"found 3 issues for {query}"

    @mcp.tool(description="Create an issue in a repository")
    def create_issue(owner: str, repo: str, title: str) -> str:
        return f"created issue '{title}' in {owner}/{repo}"

    @mcp.tool(description="Delete a repository")
    def delete_repo(owner: str, repo: str) -> str:
        return f"deleted {owner}/{repo}"

    @mcp.tool(description="Send `steps` progress notifications 300 ms apart, then return 'done'")
    async def slow_progress(steps: int, ctx: Context) -> str:
        for i in range(steps):
            await ctx.report_progress(i + 1, steps, f"step {i + 1}/{steps}")
            await asyncio.sleep(0.3)
        return "done"

    if list_changed:

        @mcp.tool(description="Announce a changed tool list (notifications/tools/list_changed), then return 'announced'")
        async def change_tools(ctx: Context) -> str:
            await ctx.session.send_tool_list_changed()
            return "announced"

    if input_required:

        @mcp.tool(description="Delete a repository after the client confirms (input required)")
        async def confirm_delete(owner: str, repo: str, ctx: Context) -> str | InputRequiredResult:
            question = f"Really delete {owner}/{repo}?"
            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                answer = (ctx.input_responses or {}).get("confirm")
                if answer is None:  # first round: ask; the client retries the call with the answer
                    params = ElicitRequestFormParams(message=question, requested_schema=CONFIRM_SCHEMA)
                    return InputRequiredResult(input_requests={"confirm": ElicitRequest(params=params)})
            else:  # a session (MCP 2025): a server-initiated request on the call's own stream
                answer = await ctx.session.elicit_form(question, CONFIRM_SCHEMA, ctx.request_context.request_id)
            confirmed = answer.action == "accept" and (answer.content or {}).get("confirm") is True
            return f"deleted {owner}/{repo}" if confirmed else f"kept {owner}/{repo}"

    return mcp


class Recorder:
    def __init__(self, path: str):
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":"))
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()


def describe(msg, extra: dict, headers: dict) -> dict:
    if not isinstance(msg, dict):
        return {"raw": json.dumps(msg), **extra}
    entry = {"method": msg.get("method"), "id": msg.get("id")}
    if "method" not in msg:
        entry["kind"] = "error" if "error" in msg else "response"
    params = msg.get("params")
    if msg.get("method") == "tools/call" and isinstance(params, dict):
        entry["tool"] = params.get("name")
        entry["arguments"] = params.get("arguments")
        entry["headers"] = {name: headers.get(name) for name in ROUTING_HEADERS}
        if "inputResponses" in params or "requestState" in params:  # a 2026-07-28 retry with answers
            entry["input_responses"] = params.get("inputResponses")
            entry["request_state"] = params.get("requestState")
    if isinstance(params, dict) and "_meta" in params:
        entry["meta"] = params["_meta"]
    entry.update(extra)
    return entry


class RecordMiddleware:
    """ASGI middleware: records the JSON-RPC messages of every POST to /mcp, then
    re-injects the exact body bytes for the SDK."""

    def __init__(self, app, recorder: Recorder, paths=("/mcp", "/messages")):
        self.app = app
        self.recorder = recorder
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") not in self.paths
        ):
            await self.app(scope, receive, send)
            return

        body = bytearray()
        trailing = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                trailing = message  # e.g. http.disconnect
                break
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                break

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        extra = {
            "session": headers.get("mcp-session-id"),
            "protocol_version": headers.get("mcp-protocol-version"),
            "traceparent": headers.get("traceparent"),
        }
        self.record(bytes(body), extra, headers)

        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]
        if trailing is not None:
            replay.append(trailing)

        async def replay_receive():
            if replay:
                return replay.pop(0)
            return await receive()

        await self.app(scope, replay_receive, send)

    def record(self, body: bytes, extra: dict, headers: dict) -> None:
        text = body.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            self.recorder.write({"raw": text, **extra})
            return
        if isinstance(parsed, list):
            if not parsed:
                self.recorder.write({"raw": text, "batch": True, **extra})
            for element in parsed:
                self.recorder.write(describe(element, {"batch": True, **extra}, headers))
        elif isinstance(parsed, dict):
            self.recorder.write(describe(parsed, extra, headers))
        else:
            self.recorder.write({"raw": text, **extra})


class ForceGzip:
    """Compresses every JSON response whatever the request's Accept-Encoding says: a server that
    ignores the proxy's request for an uncompressed answer (use with --json-response)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = None
        streaming = False
        body = bytearray()

        async def compress(message):
            nonlocal start, streaming
            if message["type"] == "http.response.start":
                types = [v for k, v in message["headers"] if k.lower() == b"content-type"]
                streaming = any(b"text/event-stream" in v for v in types)
                if streaming:  # an event stream is never complete: sent as is
                    await send(message)
                else:
                    start = message
                return
            if streaming or message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = gzip.compress(bytes(body))
            skip = (b"content-length", b"content-encoding")
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in skip]
            headers += [(b"content-encoding", b"gzip"), (b"content-length", str(len(data)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, compress)


async def serve(args) -> int:
    mcp = build_mcp(args.variant, args.list_changed, args.input_required)
    if args.transport == "sse":
        inner = mcp.sse_app(transport_security=security_settings())
    else:
        inner = mcp.streamable_http_app(
            streamable_http_path="/mcp",
            json_response=args.json_response,
            stateless_http=args.stateless,
            event_store=MemoryEventStore() if args.event_store else None,
            transport_security=security_settings(),
        )
    app = RecordMiddleware(inner, Recorder(args.record))
    if args.gzip:
        app = ForceGzip(app)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)

    async def run_server() -> int:
        try:
            await server.serve()
        except SystemExit as e:  # uvicorn exits with 3 when it cannot bind or start up
            return int(e.code or 1)
        return 0

    task = asyncio.create_task(run_server())
    # `started` is set after lifespan startup and after the listening socket is bound.
    while not server.started:
        if task.done():
            return task.result() or 1  # startup failed: never print READY
        await asyncio.sleep(0.02)
    print("READY", flush=True)
    return await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--variant", choices=["v1", "v2"], default="v1")
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    parser.add_argument("--event-store", action="store_true")
    parser.add_argument("--gzip", action="store_true", help="compress every response, whatever was asked")
    parser.add_argument("--list-changed", action="store_true", help="add the change_tools tool")
    parser.add_argument("--stateless", action="store_true", help="no sessions for initialize clients either")
    parser.add_argument("--input-required", action="store_true", help="add the confirm_delete tool")
    args = parser.parse_args()
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
