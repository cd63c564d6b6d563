"""An MCP client (official `mcp` Python SDK, Streamable HTTP or --transport sse, the older
HTTP+SSE transport) talking through Portcullis.

Test peer for Portcullis' MCP end-to-end tests.

Usage:
    mcp_client.py --url https://localhost:PORT/mcp
                  [--proxy https://127.0.0.1:PPORT --proxy-ca PROXY_CA.pem --cert CLIENT.pem --key CLIENT.key]
                  --ca ORIGIN_CA.pem --ops OPS_JSON [--timeout SECONDS]

--ca is the CA the origin certificate is checked against: Portcullis' MITM CA when going
through the proxy, the server's own CA when connecting directly (no --proxy).
--cert/--key are the client certificate presented to the proxy (mTLS on the proxy connection).

OPS_JSON is a JSON list run in order in ONE MCP session (after `initialize`); one JSON line
is printed per op:
  {"op":"list_tools"}
      -> {"op":"list_tools","tools":[names],"descriptions":{name:desc}}
  {"op":"call","tool":NAME,"args":{...}[,"timeout":SECONDS][,"meta":{...}]}
      ("meta" is sent as the request's params._meta, e.g. {"traceparent": "00-..."})
      -> {"op":"call","tool":NAME,"is_error":bool,"text":"<concatenated text content>"}
      -> {"op":"call","tool":NAME,"is_error":true,"error":{"code":..,"message":..,"data":..}}
         when the tools/call got a JSON-RPC error response (e.g. Portcullis' -32001 deny)
  {"op":"call_progress","tool":NAME,"args":{...}}
      -> like "call" plus "progress_times":[seconds since the call started, one per
         progress notification] and "progress":[progress values]
  {"op":"session"}
      -> {"op":"session","session_id":..,"protocol_version":..,"server":{"name":..,"version":..}}
On an unexpected failure: {"op":"fatal","error":"..."} and exit status 1.
"""
import argparse
import json
import os
import ssl
import sys
import threading
import time
import warnings
from datetime import timedelta

import anyio
import httpx
from mcp import ClientSession
from mcp.shared.exceptions import McpError

warnings.filterwarnings("ignore", category=DeprecationWarning)
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402

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
    if isinstance(exc, httpx.HTTPStatusError):
        body = ""
        try:
            body = exc.response.text[:300]
        except Exception:
            pass
        text += f" (status {exc.response.status_code}, body {body!r})"
    return text


def make_client_factory(args):
    origin_ctx = ssl.create_default_context(cafile=args.ca)
    proxy = None
    if args.proxy:
        proxy_ctx = ssl.create_default_context(cafile=args.proxy_ca) if args.proxy_ca else ssl.create_default_context()
        if args.cert:
            proxy_ctx.load_cert_chain(args.cert, args.key)
        proxy = httpx.Proxy(args.proxy, ssl_context=proxy_ctx)

    def factory(headers=None, timeout=None, auth=None) -> httpx.AsyncClient:
        kwargs = {
            "timeout": timeout if timeout is not None else httpx.Timeout(30.0, read=300.0),
            "verify": origin_ctx,
            "trust_env": False,  # ignore HTTP(S)_PROXY etc.: the proxy is exactly --proxy or none
        }
        if headers is not None:
            kwargs["headers"] = headers
        if auth is not None:
            kwargs["auth"] = auth
        if proxy is not None:
            kwargs["proxy"] = proxy
        return httpx.AsyncClient(**kwargs)

    return factory


def text_of(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", None) == "text")


async def run_call(session: ClientSession, op: dict, with_progress: bool) -> dict:
    tool = op["tool"]
    out = {"op": op["op"], "tool": tool}
    times: list[float] = []
    values: list[float] = []
    start = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        times.append(round(time.monotonic() - start, 4))
        values.append(progress)

    try:
        timeout = timedelta(seconds=op["timeout"]) if "timeout" in op else None
        result = await session.call_tool(
            tool,
            op.get("args") or {},
            read_timeout_seconds=timeout,
            progress_callback=on_progress if with_progress else None,
            meta=op.get("meta"),
        )
    except McpError as e:
        out["is_error"] = True
        out["error"] = {"code": e.error.code, "message": e.error.message, "data": e.error.data}
    else:
        out["is_error"] = bool(result.isError)
        out["text"] = text_of(result)
    if with_progress:
        out["progress_times"] = times
        out["progress"] = values
        out["elapsed"] = round(time.monotonic() - start, 4)
    return out


def transport(args, factory):
    if args.transport == "sse":
        return sse_client(
            args.url, timeout=min(args.timeout, 30.0), sse_read_timeout=args.timeout,
            httpx_client_factory=factory,
        )
    return streamablehttp_client(
        args.url,
        timeout=min(args.timeout, 30.0),
        sse_read_timeout=args.timeout,
        httpx_client_factory=factory,
    )


async def run(args, ops: list) -> None:
    factory = make_client_factory(args)
    async with transport(args, factory) as streams:
        read, write = streams[0], streams[1]
        get_session_id = streams[2] if len(streams) > 2 else (lambda: None)
        async with ClientSession(read, write, read_timeout_seconds=timedelta(seconds=args.timeout)) as session:
            init = await session.initialize()
            for op in ops:
                kind = op.get("op")
                if kind == "list_tools":
                    try:
                        result = await session.list_tools()
                    except Exception as e:  # noqa: BLE001 - reported to the test as is
                        emit({"op": "list_tools", "error": f"{type(e).__name__}: {e}"})
                        continue
                    extra = result.model_extra or {}
                    emit({
                        "op": "list_tools",
                        "tools": [t.name for t in result.tools],
                        "descriptions": {t.name: t.description for t in result.tools},
                        "cache_scope": extra.get("cacheScope"),
                        "ttl_ms": extra.get("ttlMs"),
                    })
                elif kind == "call":
                    emit(await run_call(session, op, with_progress=False))
                elif kind == "call_progress":
                    emit(await run_call(session, op, with_progress=True))
                elif kind == "session":
                    emit({
                        "op": "session",
                        "session_id": get_session_id(),
                        "protocol_version": str(init.protocolVersion),
                        "server": {"name": init.serverInfo.name, "version": init.serverInfo.version},
                    })
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
    args = parser.parse_args()

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
