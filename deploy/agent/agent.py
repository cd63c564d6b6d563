"""Sample agent for the compose stack: calls the demo API and the MCP server through Portcullis.

It knows nothing about mTLS or SVIDs: it uses HTTPS_PROXY (the local connector sidecar on
127.0.0.1:15001, which tunnels to Portcullis with the agent's SVID), trusts the Portcullis MITM
CA, and holds only the placeholder `pcx_demo_api`. All requests carry one W3C traceparent, so
Portcullis' spans for them form one trace in Jaeger (each CONNECT starts a trace of its own:
a CONNECT request carries no traceparent).

Prints one line per step and exits 1 if any outcome differs from what the demo policy says.
"""
import asyncio
import os
import secrets
import sys
import time
import warnings

import httpx
from mcp import ClientSession
from mcp.shared.exceptions import McpError

warnings.filterwarnings("ignore", category=DeprecationWarning)
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402

PROXY = os.environ.get("HTTPS_PROXY", "http://127.0.0.1:15001")
MITM_CA = os.environ.get("PORTCULLIS_MITM_CA", "/run/portcullis/agent-ca/mitm-ca.pem")
API_URL = os.environ.get("DEMO_API_URL", "https://demo-api:8443/hello")
MCP_URL = os.environ.get("MCP_URL", "https://mcp-server:8443/mcp")
BLOCKED_URL = os.environ.get("BLOCKED_URL", "https://vault:8200/v1/sys/health")
WAIT_SECONDS = float(os.environ.get("WAIT_SECONDS", "90"))

TRACE_ID = secrets.token_hex(16)
TRACEPARENT = f"00-{TRACE_ID}-{secrets.token_hex(8)}-01"
failures = 0


def report(ok: bool, step: str, detail: str) -> None:
    global failures
    failures += 0 if ok else 1
    print(f"[{'ok' if ok else 'UNEXPECTED'}] {step}: {detail}", flush=True)


def client(**kw) -> httpx.AsyncClient:
    # The proxy is explicit (not trust_env), so NO_PROXY and friends cannot bypass it.
    kw.setdefault("timeout", httpx.Timeout(20.0, read=60.0))
    return httpx.AsyncClient(proxy=PROXY, verify=MITM_CA, trust_env=False, **kw)


async def wait_for_proxy() -> None:
    """The connector and Portcullis may still be starting: retry until the API answers."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            async with client() as c:
                await c.get(API_URL)
            return
        except httpx.HTTPError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"proxy not reachable through {PROXY} after {WAIT_SECONDS:.0f}s: {e!r}")
            await asyncio.sleep(2)


async def call_api() -> None:
    async with client(headers={"traceparent": TRACEPARENT}) as c:
        r = await c.get(API_URL, headers={"Authorization": "Bearer pcx_demo_api"})
    body = r.json()
    report(
        r.status_code == 200 and body.get("authorized") is True,
        "demo API with placeholder pcx_demo_api",
        f"HTTP {r.status_code}, authorized={body.get('authorized')}, API echoed {body.get('you_sent')!r}",
    )


async def call_blocked() -> None:
    # Vault is on the backend network: the agent cannot reach it directly, and Portcullis
    # refuses the CONNECT (403 policy_denied: not in the agent's allow-list; were it listed, the
    # egress guard would still refuse to dial a private address outside egress.allow).
    try:
        async with client(headers={"traceparent": TRACEPARENT}) as c:
            r = await c.get(BLOCKED_URL)
        report(False, "internal service through the proxy", f"HTTP {r.status_code}: should be refused")
    except httpx.ProxyError as e:
        report(True, "internal service through the proxy", f"refused by the proxy: {e}")


async def mcp_session() -> None:
    def factory(headers=None, timeout=None, auth=None) -> httpx.AsyncClient:
        return client(headers=headers, timeout=timeout, auth=auth)

    async with streamablehttp_client(
        MCP_URL, headers={"traceparent": TRACEPARENT}, httpx_client_factory=factory
    ) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = sorted(t.name for t in (await session.list_tools()).tools)
            report(tools == ["search_issues"], "MCP tools/list", f"tools visible to this agent: {tools}")
            for tool, args, allowed in [
                ("search_issues", {"query": "flaky"}, True),
                ("create_issue", {"owner": "acme", "repo": "app", "title": "hi"}, False),
                ("delete_repo", {"owner": "acme", "repo": "app"}, False),
            ]:
                try:
                    result = await session.call_tool(tool, args)
                    text = "".join(getattr(b, "text", "") for b in result.content)
                    report(allowed and not result.isError, f"MCP tools/call {tool}", text)
                except McpError as e:
                    report(not allowed, f"MCP tools/call {tool}", f"error {e.error.code}: {e.error.message}")


async def main() -> int:
    print(f"agent: proxy {PROXY}, trace id {TRACE_ID}", flush=True)
    await wait_for_proxy()
    await call_api()
    await call_blocked()
    await mcp_session()
    print(f"agent: done, {failures} unexpected; trace: http://127.0.0.1:16686/trace/{TRACE_ID}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
