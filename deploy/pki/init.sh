#!/bin/sh
# One-shot PKI for the compose stack, run by the `pki` service (root, CAP_CHOWN only) with the
# `portcullis` binary. CAs are created once and kept in the `pki-ca` volume, which only this
# job mounts; leaf certificates are re-issued on every run. Each consumer gets a volume with
# only the files it needs, owned by uid 65532 (the non-root user of every service here).
set -eu

TD=demo.portcullis
AGENT_ID=${AGENT_SPIFFE_ID:-spiffe://demo.portcullis/agent/research}
PKI=${PKI_DIR:-/pki}    # deploy/validate.sh runs this script on a temporary directory
CA=$PKI/ca              # CA keys: this job only
PROXY=$PKI/proxy        # portcullis: server SVID, trust bundle, MITM CA, upstream CA
AGENT=$PKI/agent        # connector: the agent's SVID and the trust bundle
AGENT_CA=$PKI/agent-ca  # agent: the MITM CA certificate it must trust, nothing else
UP=$PKI/upstream        # mcp-server, demo-api: their TLS server certificate

ca() { # ca NAME "Common Name" [--trust-domain TD]
  [ -s "$CA/$1.pem" ] && [ -s "$CA/$1.key" ] && return 0
  name=$1 cn=$2; shift 2
  portcullis ca init --cert "$CA/$name.pem" --key "$CA/$name.key" --name "$cn" "$@"
}

leaf() { # leaf NAME CA SPIFFE_ID TTL [--san NAME]...: issued into the CA volume first
  name=$1 issuer=$2 id=$3 ttl=$4; shift 4
  portcullis svid issue --spiffe-id "$id" --ca "$CA/$issuer.pem" --ca-key "$CA/$issuer.key" \
    --out "$CA/leaves/$name" --ttl "$ttl" "$@"
}

put() { # put SRC DEST: mode and owner set before an atomic rename, so a reloading reader
        # never sees half a file or one it may not read
  case "$2" in *.key) mode=0600 ;; *) mode=0644 ;; esac
  cp "$1" "$2.tmp"
  chmod "$mode" "$2.tmp"
  if [ "$(id -u)" = 0 ]; then chown 65532:65532 "$2.tmp"; fi
  mv -f "$2.tmp" "$2"
}

umask 077
mkdir -p "$CA/leaves" "$PROXY" "$AGENT" "$AGENT_CA" "$UP"
ca trust-ca "Portcullis demo trust domain CA" --trust-domain "$TD"
ca mitm-ca "Portcullis demo MITM CA"
ca upstream-ca "Portcullis demo upstream CA"

leaf server trust-ca "spiffe://$TD/portcullis" 720h --san portcullis --san localhost --san 127.0.0.1
leaf agent trust-ca "$AGENT_ID" 168h
# The demo upstreams are ordinary TLS servers; their clients ignore the URI SAN.
leaf upstream upstream-ca "spiffe://upstream.demo/tools" 720h --san mcp-server --san demo-api

# The AES-256-GCM key for credentials cached in Redis: created once, like the CAs.
[ -s "$CA/cache.key" ] || head -c 32 /dev/urandom | base64 > "$CA/cache.key"
# The admin API's bearer token (the admin port is on the compose networks): created once.
[ -s "$CA/admin-token.key" ] || head -c 32 /dev/urandom | base64 | tr -d '+/=' > "$CA/admin-token.key"

put "$CA/leaves/server.pem" "$PROXY/server.pem"
put "$CA/cache.key" "$PROXY/cache.key"
put "$CA/admin-token.key" "$PROXY/admin-token.key"
put "$CA/leaves/server.key" "$PROXY/server.key"
put "$CA/trust-ca.pem" "$PROXY/trust-bundle.pem"
put "$CA/mitm-ca.pem" "$PROXY/mitm-ca.pem"
put "$CA/mitm-ca.key" "$PROXY/mitm-ca.key"
put "$CA/upstream-ca.pem" "$PROXY/upstream-ca.pem"

put "$CA/leaves/agent.pem" "$AGENT/agent.pem"
put "$CA/leaves/agent.key" "$AGENT/agent.key"
put "$CA/trust-ca.pem" "$AGENT/trust-bundle.pem"

put "$CA/mitm-ca.pem" "$AGENT_CA/mitm-ca.pem"

put "$CA/leaves/upstream.pem" "$UP/server.pem"
put "$CA/leaves/upstream.key" "$UP/server.key"

# The directories stay root-owned (0755): readable by the services, writable only here.
chmod 0755 "$PROXY" "$AGENT" "$AGENT_CA" "$UP"
echo "pki: trust domain $TD, agent $AGENT_ID: certificates issued"
