"""Sample MCP server for the compose stack: the official `mcp` SDK (FastMCP), Streamable HTTP
at https://mcp-server:8443/mcp, TLS with the certificate from the `pki` job.

Tools: search_issues (the demo policy allows it), create_issue (not in the agent's allow-list)
and delete_repo (denied for everyone). Portcullis hides the last two from the agent's
tools/list and refuses calls to them; this server never sees those calls.
"""
import os

import uvicorn
from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings

CERT = os.environ.get("TLS_CERT", "/run/tls/server.pem")
KEY = os.environ.get("TLS_KEY", "/run/tls/server.key")
PORT = int(os.environ.get("PORT", "8443"))

mcp = FastMCP(
    name="portcullis-demo-tools",
    streamable_http_path="/mcp",
    stateless_http=False,
    log_level="WARNING",
    # DNS-rebinding protection: only the name the stack uses for this service.
    transport_security=TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["mcp-server", "mcp-server:*"],
        allowed_origins=["https://mcp-server", "https://mcp-server:*"],
    ),
)


@mcp.tool(description="Search issues in the demo tracker")
def search_issues(query: str) -> str:
    return f"found 3 issues matching {query!r}: #12 flaky test, #31 slow start, #42 typo"


@mcp.tool(description="Create an issue in a repository")
def create_issue(owner: str, repo: str, title: str) -> str:
    return f"created issue {title!r} in {owner}/{repo}"


@mcp.tool(description="Delete a repository")
def delete_repo(owner: str, repo: str) -> str:
    return f"deleted {owner}/{repo}"


if __name__ == "__main__":
    uvicorn.run(
        mcp.streamable_http_app(),
        host="0.0.0.0",
        port=PORT,
        ssl_certfile=CERT,
        ssl_keyfile=KEY,
        log_level="warning",
    )
