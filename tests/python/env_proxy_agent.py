"""An agent runtime that knows nothing about Portcullis: it only has the standard proxy
environment (HTTPS_PROXY / HTTP_PROXY pointing at the local connector) and the MITM CA in
SSL_CERT_FILE (httpx) or REQUESTS_CA_BUNDLE (requests).

Usage: env_proxy_agent.py httpx|requests URL
Prints {"status": ..., "body": ...} as JSON; exits non-zero on any error.
"""
import json
import sys

client, url = sys.argv[1:3]
if client == "httpx":
    import httpx

    with httpx.Client(timeout=20) as c:  # trust_env: proxies and SSL_CERT_FILE from the env
        resp = c.get(url)
        out = {"status": resp.status_code, "body": resp.json()}
elif client == "requests":
    import requests

    resp = requests.get(url, timeout=20)  # proxies and REQUESTS_CA_BUNDLE from the env
    out = {"status": resp.status_code, "body": resp.json()}
else:
    sys.exit(f"unknown client {client}")
print(json.dumps(out))
