"""Stream resumption (Streamable HTTP, Last-Event-ID) through Portcullis, with raw httpx.

Test peer for Portcullis' MCP end-to-end tests. Initializes a session, calls the
`slow_progress` tool with an SSE response, reads up to the first progress event and drops the
connection, then resumes with GET + Last-Event-ID and reads until the tool result.

Usage:
    mcp_resume.py --url https://localhost:PORT/mcp --proxy https://127.0.0.1:PPORT
                  --proxy-ca PROXY_CA.pem --cert CLIENT.pem --key CLIENT.key --ca MITM_CA.pem

Prints one JSON line: {"first_event_id":..,"first":<message>,"replayed":[{"id":..,"message":..}]}
"""
import argparse
import json
import ssl
import sys

import httpx

ACCEPT = "application/json, text/event-stream"


def events(response):
    """(id, data) for each SSE event of a streaming httpx response."""
    event_id, data = None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def main() -> None:
    p = argparse.ArgumentParser()
    for a in ("--url", "--proxy", "--proxy-ca", "--cert", "--key", "--ca"):
        p.add_argument(a, required=True)
    args = p.parse_args()
    proxy_ctx = ssl.create_default_context(cafile=args.proxy_ca)
    proxy_ctx.load_cert_chain(args.cert, args.key)
    client = httpx.Client(
        proxy=httpx.Proxy(args.proxy, ssl_context=proxy_ctx),
        verify=ssl.create_default_context(cafile=args.ca),
        timeout=httpx.Timeout(20.0),
        trust_env=False,
    )
    headers = {"accept": ACCEPT, "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "resume-test", "version": "1"}}}
    r = client.post(args.url, json=init, headers=headers)
    r.raise_for_status()
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    headers["mcp-protocol-version"] = "2025-06-18"
    client.post(args.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=headers).raise_for_status()

    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "slow_progress", "arguments": {"steps": 4}, "_meta": {"progressToken": "p1"}}}
    first_id, first = None, None
    with client.stream("POST", args.url, json=call, headers=headers) as resp:
        resp.raise_for_status()
        for event_id, data in events(resp):
            message = json.loads(data) if data else None
            if event_id and message and message.get("method") == "notifications/progress":
                first_id, first = event_id, message
                break  # drop the connection mid-stream
    if first_id is None:
        sys.exit("no progress event with an id arrived")

    replayed = []
    get_headers = {k: v for k, v in headers.items() if k != "content-type"}
    get_headers["accept"] = "text/event-stream"
    get_headers["last-event-id"] = first_id
    with client.stream("GET", args.url, headers=get_headers) as resp:
        resp.raise_for_status()
        for event_id, data in events(resp):
            if not data:
                continue
            message = json.loads(data)
            replayed.append({"id": event_id, "message": message})
            if message.get("id") == 2:
                break
    print(json.dumps({"first_event_id": first_id, "first": first, "replayed": replayed}), flush=True)


if __name__ == "__main__":
    main()
