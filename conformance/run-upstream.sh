#!/usr/bin/env bash
# The upstream Kubernetes NetworkPolicy e2e suite (conformance/cases/upstream-netpol.yaml, all 49
# Its) on a fresh real cluster: `weft conformance run` without --oracle brings up the control
# plane, 3 node namespaces each with a weft agent and kube-proxy, replays every case (pods
# attached by weft-cni, probes through the Services from inside the pods), tears it all down,
# and prints the summary, the realization figure (API write -> every agent applied, p50/p99)
# and the time.
#
# Env: WEFT_UPSTREAM_BUDGET   seconds for the run (default 1200; then it is interrupted with
#                             SIGINT, tears down, and this script fails)
#      WEFT_CASES_FILTER      only cases whose id contains one of these (comma-separated);
#                             default: all of them (the whole file runs in about 3 minutes here)
#      WEFT_CONFORMANCE_VIA   service (default, as upstream) | pod | both
#      WEFT_UPSTREAM_IPV6=1   also replay the file in IPv6-only mode (a second cluster run)
#      CARGO_TARGET_DIR       where weft is built
# Output: the failed cases' tables, then the summary lines; the whole report and JSON are kept in
# ${WEFT_UPSTREAM_OUT:-/tmp/weft-upstream}/.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BUDGET=${WEFT_UPSTREAM_BUDGET:-1200}
OUT=${WEFT_UPSTREAM_OUT:-/tmp/weft-upstream}
CASES="$HERE/cases/upstream-netpol.yaml"

[[ "$(id -u)" == 0 ]] || { echo "run-upstream: must run as root" >&2; exit 2; }
(cd "$REPO" && cargo build -q -p weft -p weft-cni) || { echo "run-upstream: build failed"; exit 1; }
# Pods are attached through libcni (cnitool), as a container runtime attaches them.
WEFT_CNITOOL=$(bash "$HERE/cni/install-cnitool.sh") || { echo "run-upstream: cnitool build failed"; exit 1; }
export WEFT_CNITOOL
echo "run-upstream: plugins called through libcni: $WEFT_CNITOOL"
mkdir -p "$OUT"

run() { # name extra-args...
  local name=$1 rc t0=$SECONDS; shift
  echo "run-upstream: $name (budget ${BUDGET}s; progress in $OUT/$name.log)"
  timeout --signal=INT --kill-after=120 "$BUDGET" \
    "$TARGET/debug/weft" conformance run --cases "$CASES" --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.txt" 2>"$OUT/$name.log" </dev/null
  rc=$?
  # failed cases with their tables (not after an interruption: then every later case failed
  # unrun), the skipped ones, then the closing lines
  if ((rc != 124 && rc != 137)); then
    awk '/^(PASS|SKIP) |^[0-9]+ passed, /{p=0} /^FAIL /{p=1} p' "$OUT/$name.txt" | sed -n 1,600p
  fi
  grep -E '^SKIP ' "$OUT/$name.txt" | cut -c1-200
  grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$|^realization |^time: ' "$OUT/$name.txt"
  if ((rc == 124 || rc == 137)); then
    echo "run-upstream: $name: over its budget of ${BUDGET}s"
  elif ((rc == 2)); then
    tail -n 20 "$OUT/$name.log"
  fi
  echo "run-upstream: $name: exit $rc after $((SECONDS - t0))s"
  return "$rc"
}

failed=0
run ipv4 || failed=1
if [[ "${WEFT_UPSTREAM_IPV6:-0}" == 1 ]]; then
  run ipv6 --ipv6 || failed=1
fi
# Nothing of the run may be left (the harness tears down on every exit; a SIGKILL after the
# budget's grace would not, so clean up here too).
if ip netns list 2>/dev/null | awk '{print $1}' | grep '^weft-cf-' >/dev/null; then
  echo "run-upstream: namespaces left behind: removing them"
  bash "$HERE/k8s/cluster.sh" down "${WEFT_CONFORMANCE_DIR:-/tmp/weft-cf}/cluster" >/dev/null 2>&1 || true
  failed=1
fi
exit "$failed"
