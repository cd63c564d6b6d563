"""An agent runtime's view of Portcullis: Python httpx with the SVID on the proxy connection.

Usage: httpx_agent.py PROXY_URL PROXY_CA CERT KEY MITM_CA URL [HEADERS_JSON]
Prints the status, the JSON body (decoded as httpx decodes it: gzip included) and the response
headers; exits non-zero on any error.
"""
import json
import ssl
import sys

import httpx

proxy_url, proxy_ca, cert, key, mitm_ca, url = sys.argv[1:7]
headers = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
proxy_ctx = ssl.create_default_context(cafile=proxy_ca)
proxy_ctx.load_cert_chain(cert, key)
proxy = httpx.Proxy(proxy_url, ssl_context=proxy_ctx)
with httpx.Client(proxy=proxy, verify=mitm_ca, timeout=20) as client:
    resp = client.get(url, headers=headers)
    print(json.dumps({"status": resp.status_code, "body": resp.json(), "headers": dict(resp.headers)}))
