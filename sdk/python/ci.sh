#!/usr/bin/env bash
# The Python SDK's checks, as .ci/run runs them (after `cargo test`): `bash sdk/python/ci.sh`.
# Builds the wheel and the sdist, installs the wheel in a fresh venv (target/sdk-venv), then runs
# mypy --strict, ruff and pytest against a real `flex up --demo` ($FLEX_BIN, default
# target/debug/flex, built here if missing). pytest's output goes to target/sdk-test-output.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

venv=target/sdk-venv
dist=target/sdk-dist
pip_q=(--quiet --disable-pip-version-check)

if [ -z "${FLEX_BIN:-}" ]; then
  cargo build --locked --bin flex
  export FLEX_BIN="$root/target/debug/flex"
fi
[ -x "$FLEX_BIN" ] || { echo "FLEX_BIN=$FLEX_BIN is not an executable flex binary" >&2; exit 1; }

rm -rf "$venv" "$dist"
python3 -m venv "$venv"
# The build backend goes in the venv too, so the build needs no isolated environments.
"$venv/bin/pip" install "${pip_q[@]}" build hatchling pytest mypy ruff

echo "building the wheel and the sdist"
"$venv/bin/python" -m build --no-isolation --outdir "$dist" sdk/python >target/sdk-build.log 2>&1 \
  || { cat target/sdk-build.log >&2; echo "python -m build failed" >&2; exit 1; }
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' sdk/python/src/flexinference/_version.py)
wheel="$dist/flexinference-$version-py3-none-any.whl"
sdist="$dist/flexinference-$version.tar.gz"
ls -l "$wheel" "$sdist"
"$venv/bin/python" - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile
wheel = set(zipfile.ZipFile(sys.argv[1]).namelist())
for name in ("flexinference/__init__.py", "flexinference/py.typed"):
    assert name in wheel, f"{name} is missing from the wheel"
meta = next(n for n in wheel if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
runtime = [l for l in text.splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l]
assert [l.split()[1][:5] for l in runtime] == ["httpx"], f"httpx must be the only dependency: {runtime}"
assert "License-Expression: MIT" in text, "the wheel must say MIT"
sdist = tarfile.open(sys.argv[2]).getnames()
assert any(n.endswith("/tests/test_readme.py") for n in sdist), "the sdist must carry the tests"
print("wheel and sdist: ok")
EOF

"$venv/bin/pip" install "${pip_q[@]}" "$wheel"
# The tests must import the installed wheel, not the source tree.
(cd /tmp && "$root/$venv/bin/python" -c 'import flexinference, sys; p = flexinference.__file__; print("testing", flexinference.__version__, "at", p); sys.exit("site-packages" not in p)')

echo "mypy --strict"
(cd sdk/python && "$root/$venv/bin/mypy")
echo "ruff"
(cd sdk/python && "$root/$venv/bin/ruff" check . && "$root/$venv/bin/ruff" format --check .)

echo "pytest against $FLEX_BIN"
(cd sdk/python && "$root/$venv/bin/python" -m pytest -p no:cacheprovider) 2>&1 | tee target/sdk-test-output.txt
