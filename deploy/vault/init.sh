#!/bin/sh
# One-shot Vault setup for the compose stack (run by `vault-init` in the Vault image, as root
# with CAP_CHOWN only): stores the demo API key in KV v2 (secret/agents/demo-api, field
# `token`), gives the demo API the same key (it is the API's side of the secret), and writes
# a token that may only read secret/data/agents/* for Portcullis. Vault dev mode keeps all of
# this in memory: after a Vault restart, run this job again.
# ROTATE=1 makes a new key (to demonstrate revocation).
set -eu
umask 077
: "${VAULT_ADDR:?}" "${VAULT_TOKEN:?}"
KEY=/demo-api/api-key
TOKEN=/portcullis-vault/token

own() { # own FILE: root:65532 mode 0440 (this job, without CAP_DAC_*, can still read it on
        # a re-run; the services, gid 65532, read it by group), moved into place atomically
  chmod 0440 "$1.tmp"
  chown 0:65532 "$1.tmp"
  mv -f "$1.tmp" "$1"
}

if [ ! -s "$KEY" ] || [ "${ROTATE:-0}" = 1 ]; then
  printf 'demo-%s' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$KEY.tmp"
  own "$KEY"
fi
vault kv put -mount=secret agents/demo-api token="$(cat "$KEY")" > /dev/null

vault policy write portcullis-read - > /dev/null <<'POLICY'
path "secret/data/agents/*" {
  capabilities = ["read"]
}
POLICY
vault token create -policy=portcullis-read -ttl=720h -display-name=portcullis \
  -field=token > "$TOKEN.tmp"
own "$TOKEN"
echo "vault-init: secret/agents/demo-api written; Portcullis token (read-only) issued"
