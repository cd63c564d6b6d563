"""An MCP client (official `mcp` Python SDK 2.x, Streamable HTTP or --transport sse, the older
HTTP+SSE transport) talking through Portcullis.

Test peer for Portcullis' MCP end-to-end tests: mcp_client.py's interface and output on the 2.x
SDK (tests/python/requirements-mcp2.txt), which also speaks MCP 2026-07-28.

Usage:
    mcp2_client.py --url https://localhost:PORT/mcp
                   [--proxy https://127.0.0.1:PPORT --proxy-ca PROXY_CA.pem --cert CLIENT.pem --key CLIENT.key]
                   --ca ORIGIN_CA.pem --ops OPS_JSON [--timeout SECONDS] [--mode auto|legacy|2026-07-28]

--ca is the CA the origin certificate is checked against: Portcullis' MITM CA when going
through the proxy, the server's own CA when connecting directly (no --proxy).
--cert/--key are the client certificate presented to the proxy (mTLS on the proxy connection).
--mode picks the protocol version as the SDK's Client(mode=...) does: auto (the default for
Streamable HTTP) sends `server/discover` at 2026-07-28 and uses 2026-07-28 (no session) if the
server answers it, else `initialize` (a session, 2025-11-25 or older; such a server still
receives, and refuses, that server/discover); legacy (the default with --transport sse) always
`initialize`s; 2026-07-28 uses that version without asking.
At 2026-07-28 every request carries MCP-Protocol-Version, Mcp-Method and, for tools/call,
Mcp-Name headers that must match its body.

OPS_JSON is a JSON list run in order on ONE connection (one MCP session after `initialize`, or
self-contained 2026-07-28 requests); one JSON line is printed per op:
  {"op":"list_tools"}
      -> {"op":"list_tools","tools":[names],"descriptions":{name:desc},"cache_scope":..,"ttl_ms":..}
         (cacheScope/ttlMs of the tools/list result as received, null when absent)
  {"op":"call","tool":NAME,"args":{...}[,"timeout":SECONDS][,"meta":{...}]}
      ("meta" is sent as the request's params._meta, e.g. {"traceparent": "00-..."})
      -> {"op":"call","tool":NAME,"is_error":bool,"text":"<concatenated text content>"}
      -> {"op":"call","tool":NAME,"is_error":true,"error":{"code":..,"message":..,"data":..}}
         when the tools/call got a JSON-RPC error response (e.g. Portcullis' -32001 deny)
  {"op":"call_progress","tool":NAME,"args":{...}}
      -> like "call" plus "progress_times":[seconds since the call started, one per
         progress notification] and "progress":[progress values]
  {"op":"confirm","tool":NAME,"args":{...},"answer":true|false}
      -> like "call" plus "asked":[messages]: the tool's questions (elicitation/create, inside an
         InputRequiredResult at 2026-07-28, the SDK then retries the call with the answers), each
         answered with {"confirm": answer}
  {"op":"session"}
      -> {"op":"session","session_id":<Mcp-Session-Id or null>,"protocol_version":..,
          "server":{"name":..,"version":..} or null (null: a 2026-07-28 server that did not say)}
  {"op":"discover"}
      -> {"op":"discover","result":{<server/discover result as received>}}
      -> {"op":"discover","error":{"code":..,"message":..,"data":..}}
On an unexpected failure: {"op":"fatal","error":"..."} and exit status 1.
"""
import argparse
import json
import os
import ssl
import sys
import threading
import time
from contextlib import asynccontextmanager

import anyio
import httpx2
from mcp import Client, MCPError
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ElicitResult, JSONRPCResponse
from mcp.types.version import LATEST_MODERN_VERSION

_print_lock = threading.Lock()


def emit(obj: dict) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def fatal_text(exc: BaseException) -> str:
    """Flatten (nested) exception groups into a readable message."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(fatal_text(e) for e in exc.exceptions)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, httpx2.HTTPStatusError):
        body = ""
        try:
            body = exc.response.text[:300]
        except Exception:
            pass
        text += f" (status {exc.response.status_code}, body {body!r})"
    return text


def error_of(e: MCPError) -> dict:
    return {"code": e.error.code, "message": e.error.message, "data": e.error.data}


class Seen:
    """What the SDK does not hand out: the session id and the raw tools/list result (on a
    2025 session the SDK drops 2026-07-28 fields such as cacheScope from results)."""

    def __init__(self):
        self.session_id = None
        self.tools_result = {}

    async def on_response(self, response: httpx2.Response) -> None:
        self.session_id = response.headers.get("mcp-session-id") or self.session_id


class TappedStream:
    """The transport's read stream, passed through as is; notes each tools/list result."""

    def __init__(self, stream, seen: Seen):
        self.stream, self.seen = stream, seen

    @property
    def last_context(self):
        return getattr(self.stream, "last_context", None)

    async def receive(self):
        item = await self.stream.receive()
        message = getattr(item, "message", None)
        if isinstance(message, JSONRPCResponse) and "tools" in message.result:
            self.seen.tools_result = message.result
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def make_client_factory(args, seen: Seen):
    origin_ctx = ssl.create_default_context(cafile=args.ca)
    proxy = None
    if args.proxy:
        proxy_ctx = ssl.create_default_context(cafile=args.proxy_ca) if args.proxy_ca else ssl.create_default_context()
        if args.cert:
            proxy_ctx.load_cert_chain(args.cert, args.key)
        proxy = httpx2.Proxy(args.proxy, ssl_context=proxy_ctx)

    def factory(headers=None, timeout=None, auth=None) -> httpx2.AsyncClient:
        kwargs = {
            "timeout": timeout if timeout is not None else httpx2.Timeout(30.0, read=300.0),
            "verify": origin_ctx,
            "trust_env": False,  # ignore HTTP(S)_PROXY etc.: the proxy is exactly --proxy or none
            "event_hooks": {"response": [seen.on_response]},
        }
        if headers is not None:
            kwargs["headers"] = headers
        if auth is not None:
            kwargs["auth"] = auth
        if proxy is not None:
            kwargs["proxy"] = proxy
        return httpx2.AsyncClient(**kwargs)

    return factory


@asynccontextmanager
async def transport(args, seen: Seen):
    factory = make_client_factory(args, seen)
    timeout = min(args.timeout, 30.0)
    if args.transport == "sse":
        inner = sse_client(args.url, timeout=timeout, sse_read_timeout=args.timeout, httpx_client_factory=factory)
    else:
        inner = streamable_http_client(args.url, http_client=factory(timeout=httpx2.Timeout(timeout, read=args.timeout)))
    async with inner as (read, write):
        yield TappedStream(read, seen), write


def text_of(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", None) == "text")


async def run_call(client: Client, op: dict, with_progress: bool) -> dict:
    tool = op["tool"]
    out = {"op": op["op"], "tool": tool}
    times: list[float] = []
    values: list[float] = []
    start = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        times.append(round(time.monotonic() - start, 4))
        values.append(progress)

    try:
        result = await client.call_tool(
            tool,
            op.get("args") or {},
            read_timeout_seconds=op.get("timeout"),
            progress_callback=on_progress if with_progress else None,
            meta=op.get("meta"),
        )
    except MCPError as e:
        out["is_error"] = True
        out["error"] = error_of(e)
    else:
        out["is_error"] = bool(result.is_error)
        out["text"] = text_of(result)
    if with_progress:
        out["progress_times"] = times
        out["progress"] = values
        out["elapsed"] = round(time.monotonic() - start, 4)
    return out


async def run(args, ops: list) -> None:
    seen = Seen()
    answer = {"confirm": False, "asked": []}

    async def on_elicit(context, params) -> ElicitResult:
        answer["asked"].append(params.message)
        return ElicitResult(action="accept", content={"confirm": answer["confirm"]})

    # No response cache: every op goes on the wire. The elicitation capability only when asked.
    confirm = any(op.get("op") == "confirm" for op in ops)
    async with Client(transport(args, seen), mode=args.mode, read_timeout_seconds=args.timeout, cache=None,
                      elicitation_callback=on_elicit if confirm else None) as client:
        for op in ops:
            kind = op.get("op")
            if kind == "list_tools":
                seen.tools_result = {}
                try:
                    result = await client.list_tools()
                except Exception as e:  # noqa: BLE001 - reported to the test as is
                    emit({"op": "list_tools", "error": f"{type(e).__name__}: {e}"})
                    continue
                emit({
                    "op": "list_tools",
                    "tools": [t.name for t in result.tools],
                    "descriptions": {t.name: t.description for t in result.tools},
                    "cache_scope": seen.tools_result.get("cacheScope"),
                    "ttl_ms": seen.tools_result.get("ttlMs"),
                })
            elif kind == "call":
                emit(await run_call(client, op, with_progress=False))
            elif kind == "call_progress":
                emit(await run_call(client, op, with_progress=True))
            elif kind == "confirm":
                answer["confirm"], answer["asked"] = bool(op.get("answer")), []
                emit({**await run_call(client, op, with_progress=False), "asked": answer["asked"]})
            elif kind == "session":
                info = client.server_info
                emit({
                    "op": "session",
                    "session_id": seen.session_id,
                    "protocol_version": client.protocol_version,
                    "server": info and {"name": info.name, "version": info.version},
                })
            elif kind == "discover":
                try:
                    emit({"op": "discover", "result": await client.session.send_discover(LATEST_MODERN_VERSION)})
                except MCPError as e:
                    emit({"op": "discover", "error": error_of(e)})
            else:
                raise ValueError(f"unknown op: {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--proxy")
    parser.add_argument("--proxy-ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--ops", required=True, help="JSON list of ops")
    parser.add_argument("--timeout", type=float, default=30.0, help="overall bound in seconds")
    parser.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    parser.add_argument("--mode", choices=["auto", "legacy", LATEST_MODERN_VERSION])
    args = parser.parse_args()
    if args.mode is None:
        args.mode = "legacy" if args.transport == "sse" else "auto"

    # Last-resort watchdog: never hang, even if cleanup blocks.
    def watchdog() -> None:
        time.sleep(args.timeout + 5)
        emit({"op": "fatal", "error": f"watchdog: still running after {args.timeout + 5:.0f}s"})
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()

    try:
        ops = json.loads(args.ops)
        if not isinstance(ops, list):
            raise ValueError("--ops must be a JSON list")
        if args.cert and not args.key:
            raise ValueError("--cert needs --key")

        async def bounded() -> None:
            with anyio.fail_after(args.timeout):
                await run(args, ops)

        anyio.run(bounded)
    except BaseException as e:  # noqa: BLE001 - report everything, including exception groups
        if isinstance(e, SystemExit):
            raise
        if isinstance(e, TimeoutError):
            emit({"op": "fatal", "error": f"timeout after {args.timeout}s"})
        else:
            emit({"op": "fatal", "error": fatal_text(e)})
        sys.stdout.flush()
        os._exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
