#!/usr/bin/env bash
# Validate the deployment files without a container engine (for CI):
#   1. docker-compose.yml: `docker compose config -q` (Compose v2, plugin or standalone);
#   2. every YAML file under deploy/ parses; the Kubernetes manifests have apiVersion, kind
#      and metadata.name, and `kubectl kustomize deploy/kubernetes` renders (if kubectl is here);
#   3. the Kubernetes policy ConfigMap carries the same decision.rego/decision_test.rego as
#      deploy/portcullis/policy/;
#   4. with a portcullis binary ($PORTCULLIS_BIN, target/release, target/debug or PATH):
#      the transparent pod's nft rules equal `connect --print-rules`;
#      the policies' Rego tests pass, and `portcullis check` accepts deploy/portcullis/portcullis.yaml
#      on a PKI made by deploy/pki/init.sh in a temporary directory.
# Compose v2 missing: installs Debian's `docker-compose` package when run as root with apt
# (Debian 13's is Compose v2; on Debian 12, whose package is Compose v1, it installs Debian 13's
# package, which needs only libc6 >= 2.34). DEPLOY_VALIDATE_INSTALL=0 turns that off.
# Prints one line per check; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "validate: FAIL: $*" >&2; exit 1; }
ok() { echo "validate: ok: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- 1. Compose ----------------------------------------------------------------------------
is_v2() { "$@" version --short 2>/dev/null | grep -Eq '^v?[2-9]\.'; }
find_compose() {
  if command -v docker >/dev/null && is_v2 docker compose; then compose=(docker compose)
  elif command -v docker-compose >/dev/null && is_v2 docker-compose; then compose=(docker-compose)
  else return 1; fi
}
install_compose() {
  [ "${DEPLOY_VALIDATE_INSTALL:-1}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || return 1
  echo "validate: Compose v2 not found: installing Debian's docker-compose package" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Debian 12 (bookworm) ships Compose v1 as docker-compose: skip it, take Debian 13's below.
  if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq docker-compose >/dev/null 2>&1 || true
    find_compose && return 0
  fi
  # Debian 13's (trixie) package: Compose v2, needs only libc6 >= 2.34. Fetched with a
  # private source list, so the machine's apt sources stay as they are.
  local a="$tmp/apt"
  mkdir -p "$a/lists/partial" "$a/cache"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$a/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$a/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache")
  apt-get "${opts[@]}" update -qq >/dev/null 2>&1 &&
    (cd "$a" && apt-get "${opts[@]}" download docker-compose >/dev/null 2>&1) &&
    dpkg -i "$a"/docker-compose_*.deb >/dev/null 2>&1 &&
    find_compose
}
find_compose || install_compose || fail "no Docker Compose v2 found or installable.
  Debian 13: apt-get install docker-compose   (or docker-cli + docker-compose for 'docker compose')
  Debian 12: the docker-compose package there is Compose v1 (not supported); install Debian 13's
             docker-compose package (Compose v2, needs only libc6 >= 2.34), or Docker's
             docker-compose-plugin from Docker's own apt repository.
  pip's docker-compose is Compose v1 and is not supported either."
out=$("${compose[@]}" -f docker-compose.yml config -q 2>&1) ||
  fail "docker-compose.yml: ${compose[*]} config -q:
$out"
ok "docker-compose.yml ($("${compose[@]}" version --short 2>/dev/null | head -1), ${compose[*]} config -q)"

# --- 2 and 3. YAML, Kubernetes manifests, policy copies -------------------------------------
command -v python3 >/dev/null || fail "python3 is needed (apt-get install python3 python3-yaml)"
python3 -c 'import yaml' 2>/dev/null || fail "PyYAML is needed (apt-get install python3-yaml)"
python3 - "$tmp/k8s-policy" <<'PY' || exit 1
import pathlib, sys, yaml

def fail(msg):
    print(f"validate: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

files = sorted(p for p in pathlib.Path("deploy").rglob("*") if p.suffix in (".yaml", ".yml"))
for path in files:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{path}: {e}")
    if path.parent.name != "kubernetes":
        continue
    for i, d in enumerate(docs):
        if d.get("kind") == "Kustomization":
            continue
        for key in ("apiVersion", "kind"):
            if not d.get(key):
                fail(f"{path}: document {i + 1}: no {key}")
        if not (d.get("metadata") or {}).get("name"):
            fail(f"{path}: document {i + 1} ({d['kind']}): no metadata.name")

# The policy ConfigMap: same Rego as deploy/portcullis/policy/portcullis/, written out for
# the Rego tests below.
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True)
docs = yaml.safe_load_all(pathlib.Path("deploy/kubernetes/portcullis.yaml").read_text())
policy = next(d for d in docs if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "portcullis-policy")
for name in ("decision.rego", "decision_test.rego"):
    want = pathlib.Path("deploy/portcullis/policy/portcullis", name).read_text()
    if policy["data"].get(name) != want:
        fail(f"deploy/kubernetes/portcullis.yaml: ConfigMap portcullis-policy {name} differs from "
             f"deploy/portcullis/policy/portcullis/{name}: copy it over")
for name, text in policy["data"].items():
    (out / name).write_text(text)
print(f"validate: ok: {len(files)} YAML files parse; Kubernetes manifests well-formed; policy copies match")
PY
if command -v kubectl >/dev/null; then
  out=$(kubectl kustomize deploy/kubernetes 2>&1) || fail "kubectl kustomize deploy/kubernetes:
$out"
  ok "kubectl kustomize deploy/kubernetes renders ($(grep -c '^kind:' <<<"$out") objects)"
else
  echo "validate: skipped: kubectl kustomize (no kubectl)"
fi

# --- 4. With the portcullis binary ----------------------------------------------------------
bin=${PORTCULLIS_BIN:-}
for b in target/release/portcullis target/debug/portcullis "$(command -v portcullis || true)"; do
  if [ -z "$bin" ] && [ -n "$b" ] && [ -x "$b" ]; then bin=$b; fi
done
if [ -z "$bin" ]; then
  echo "validate: skipped: policy tests and portcullis check (no portcullis binary; set PORTCULLIS_BIN)"
  exit 0
fi
run() { # run CMD...: quiet unless it fails
  local out
  out=$("$@" 2>&1) || fail "$*:
$out"
}
run "$bin" policy test deploy/portcullis/policy
run "$bin" policy test "$tmp/k8s-policy"
ok "Rego tests pass (deploy/portcullis/policy, Kubernetes ConfigMap policy)"

# portcullis check on the compose config, with a PKI from deploy/pki/init.sh and the
# container paths rewritten to the temporary directory.
run env PATH="$(cd "$(dirname "$bin")" && pwd):$PATH" PKI_DIR="$tmp/pki" sh deploy/pki/init.sh
mkdir -p "$tmp/etc" "$tmp/vault"
printf 'validate-token' > "$tmp/vault/token"
cp -r deploy/portcullis/policy "$tmp/etc/policy"
sed -e "s|/run/portcullis/tls/|$tmp/pki/proxy/|g" -e "s|/run/portcullis/vault/|$tmp/vault/|g" \
  deploy/portcullis/portcullis.yaml > "$tmp/etc/portcullis.yaml"
if grep -q '/run/portcullis' "$tmp/etc/portcullis.yaml"; then
  fail "deploy/portcullis/portcullis.yaml: a /run/portcullis path this check does not map"
fi
run "$bin" check --config "$tmp/etc/portcullis.yaml"
ok "portcullis check accepts deploy/portcullis/portcullis.yaml ($bin)"

# The transparent pod's capture rules are what `connect --print-rules` prints for them.
"$bin" connect --print-rules --listen 127.0.0.1:15001 --uid 65533 | sed -n '/^table/,/^}/p' \
  > "$tmp/rules.want"
python3 - "$tmp/rules.have" <<'PY'
import sys, yaml
docs = yaml.safe_load_all(open("deploy/kubernetes/agent-transparent.yaml"))
rules = next(d for d in docs if d and d.get("kind") == "ConfigMap")["data"]["rules.nft"]
open(sys.argv[1], "w").write(rules)
PY
diff -u "$tmp/rules.want" "$tmp/rules.have" >&2 \
  || fail "deploy/kubernetes/agent-transparent.yaml: rules.nft differs from connect --print-rules"
ok "the transparent pod's rules are connect --print-rules' (uid 65533, port 15001)"
