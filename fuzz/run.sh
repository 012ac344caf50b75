#!/usr/bin/env bash
# fuzz/run.sh MINUTES [TARGET...]: runs each fuzz target (all of them by default) for MINUTES,
# one at a time (this machine has 2 cores), and prints executions and crashes per target.
#
# cargo-fuzz needs a nightly compiler; RUSTC_BOOTSTRAP=1 lets the stable one build it. It is
# installed into target/tools when missing. Builds are optimized with debug assertions (overflow
# checks on) and no sanitizer (the workspace forbids unsafe code; FUZZ_SANITIZER=address to add
# ASan). libFuzzer runs in fork mode and goes on after a crash, so one run counts every crash;
# each is saved in fuzz/artifacts/<target>/ (reproduce: cargo fuzz run <target> <file>). New
# inputs go to fuzz/corpus/<target>/ (not committed); fuzz/seeds/<target>/ is the seed corpus.
set -euo pipefail
cd "$(dirname "$0")"
minutes=${1:?usage: fuzz/run.sh MINUTES [TARGET...]}
shift
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}

if command -v cargo-fuzz >/dev/null; then
  fuzz=(cargo-fuzz)
else
  fuzz=(../target/tools/bin/cargo-fuzz)
  if [ ! -x "${fuzz[0]}" ]; then
    echo "cargo-fuzz is missing; installing it into target/tools"
    cargo install --quiet --locked --root ../target/tools cargo-fuzz
  fi
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" fuzz list)
fi

echo "==> cargo fuzz build (every target; the first build compiles the data plane, minutes)"
"${fuzz[@]}" fuzz build --sanitizer "$sanitizer"

mkdir -p logs
results=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  echo "==> $t: ${minutes} min"
  # JSON-shaped inputs get the dictionary of the formats' and providers' words.
  dict=()
  case "$t" in format_* | provider_* | chat_assembler | usage_log) dict=(-dict=dicts/json.dict) ;; esac
  "${fuzz[@]}" fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- "${dict[@]}" \
    -max_total_time=$((minutes * 60)) -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -timeout=10 -rss_limit_mb=2048 \
    >"logs/$t.log" 2>&1 || true
  # Fork mode's status lines: "#<execs>: cov: .. ft: .. corp: .. exec/s .. oom/timeout/crash: o/t/c ..".
  last=$(grep -E '^#[0-9]+: cov:' "logs/$t.log" | tail -1 || true)
  execs=$(sed -nE 's/^#([0-9]+):.*/\1/p' <<<"$last")
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  otc=$(sed -nE 's|.*oom/timeout/crash: ([0-9]+/[0-9]+/[0-9]+).*|\1|p' <<<"$last")
  after=$(find "artifacts/$t" -type f | wc -l)
  results+=("$(printf '%-22s %8s %14s %8s %18s %10s' "$t" "$minutes" "${execs:-?}" "${cov:-?}" "${otc:-?}" "$((after - before))")")
done

echo
printf '%-22s %8s %14s %8s %18s %10s\n' target minutes executions coverage oom/timeout/crash artifacts
printf '%s\n' "${results[@]}"
