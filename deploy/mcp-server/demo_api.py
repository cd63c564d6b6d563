"""Sample HTTPS API for the compose stack (https://demo-api:8443/hello).

It wants `Authorization: Bearer <key>`, the key that `vault-init` generated and also stored in
Vault. The agent only holds the placeholder `pcx_demo_api`; Portcullis substitutes the real key
on the way in. The response echoes the Authorization header it received, as a careless API
might: Portcullis redacts the echoed secret before the agent sees it.
"""
import hmac
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

CERT = os.environ.get("TLS_CERT", "/run/tls/server.pem")
KEY = os.environ.get("TLS_KEY", "/run/tls/server.key")
API_KEY_FILE = os.environ.get("API_KEY_FILE", "/run/demo-api/api-key")
PORT = int(os.environ.get("PORT", "8443"))


def api_key() -> str:
    # Read on every request, so a rotated key (vault-init with ROTATE=1) applies at once.
    with open(API_KEY_FILE, encoding="utf-8") as f:
        return f.read().strip()


async def hello(request: Request) -> JSONResponse:
    sent = request.headers.get("authorization", "")
    ok = hmac.compare_digest(sent.encode(), f"Bearer {api_key()}".encode())
    body = {
        "message": "hello from the demo API" if ok else "unauthorized",
        "authorized": ok,
        "you_sent": sent,
    }
    return JSONResponse(body, status_code=200 if ok else 401)


app = Starlette(routes=[Route("/hello", hello)])

if __name__ == "__main__":
    uvicorn.run(app, host="0.0.0.0", port=PORT, ssl_certfile=CERT, ssl_keyfile=KEY, log_level="warning")
