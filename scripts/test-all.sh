#!/usr/bin/env bash
# Every test tier of weft, least powerful first, each with a time budget. Run as root on
# Debian 12: `./scripts/test-all.sh`. CI (.ci/run) runs exactly this.
#
#   1 static   shell pipe lint, cargo fmt --check, clippy -D warnings     budget 15 min
#   2 pure     engine, model, oracle, simulator, proptests, goldens, cases  budget 15 min
#   3 kernel   nftables backend, dataplane, CNI plugin in throwaway netns   budget 20 min
#   4 cluster  real etcd + kube-apiserver + controller-manager in netns     budget 50 min (cold build)
#   5 bench    engine benchmark at reduced size (WEFT_BENCH_SIZE=full for 10k pods)  budget 15 min
#
# WEFT_TIERS="pure kernel" runs a subset. Builds are cached outside the clone under
# ${WEFT_CACHE:-/var/cache/weft} (cargo target dir, Kubernetes binaries keyed by version).
set -uo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

bash scripts/setup.sh || exit 1
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
[ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"

export WEFT_CACHE="${WEFT_CACHE:-/var/cache/weft}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WEFT_CACHE/target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR=never
TIERS="${WEFT_TIERS:-static pure kernel cluster bench}"
BENCH_SIZE="${WEFT_BENCH_SIZE:-small}"

passed=0; failed=0; report=()
tier() {
  local name=$1 budget=$2; shift 2
  case " $TIERS " in *" $name "*) ;; *) report+=("$(printf '%-8s skipped (not in WEFT_TIERS)' "$name")"); return 0;; esac
  echo
  echo "==== tier $name (budget ${budget}s): $*"
  local start=$SECONDS
  # Tier bodies are shell functions: run them in a child bash so `timeout` can bound them.
  if timeout --kill-after=30 "$budget" bash -c "set -o pipefail; cd '$here'; $*"; then
    passed=$((passed + 1)); report+=("$(printf '%-8s passed in %4ds' "$name" $((SECONDS - start)))")
  else
    local rc=$?
    failed=$((failed + 1))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      report+=("$(printf '%-8s FAILED: over its %ss budget' "$name" "$budget")")
    else
      report+=("$(printf '%-8s FAILED (exit %d) after %ds' "$name" $rc $((SECONDS - start)))")
    fi
  fi
}


static_tier() {
  bash scripts/lint-shell.sh && cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings
}
pure_tier() {
  cargo test -p weft-netpol -p weft -p weft-conformance && cargo test -p weft-mesh --lib
}
kernel_tier() {
  # nftables backend (apply/dump/adopt, traffic, anti-spoofing), then the dataplane (IPAM
  # stress with kill -9, veth attach, VXLAN across three node namespaces) and the CNI plugin.
  cargo test -p weft-nft -- --test-threads=2 \
    && cargo test -p weft-dataplane -p weft-cni -- --test-threads=2 \
    && cargo test -p weft-mesh --tests
}
cluster_tier() {
  bash conformance/k8s/install.sh && bash conformance/k8s/smoke-test.sh \
    && cargo build -q -p weft -p weft-cni && bash conformance/lab/lab-test.sh \
    && bash conformance/k8s/manifests-test.sh \
    && bash conformance/k8s/agent-test.sh \
    && bash conformance/lab/handoff-test.sh \
    && bash conformance/lab/handoff-test.sh --encryption \
    && bash conformance/mesh/mesh-test.sh \
    && bash conformance/run-upstream.sh
}
bench_tier() {
  WEFT_BENCH_SIZE="$BENCH_SIZE" cargo bench -p weft-netpol --bench engine
}

export -f static_tier pure_tier kernel_tier cluster_tier bench_tier
export BENCH_SIZE
before_ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^weft' || true)
[ -n "$before_ns" ] && echo "note: weft namespaces existed before this run (not judged): $before_ns"
total=$SECONDS
tier static 900 static_tier
tier pure 900 pure_tier
tier kernel 1200 kernel_tier
tier cluster 3000 cluster_tier
tier bench 900 bench_tier

# Nothing may be left behind: namespaces of ours (that were not there before this run), or
# weft tables in the root namespace.
left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^weft' | grep -vxF -f <(printf '%s\n' $before_ns) | tr '\n' ' ')
if [ -n "$left" ]; then
  failed=$((failed + 1)); report+=("cleanup  FAILED: namespaces left behind: $left")
fi
if nft list tables 2>/dev/null | grep weft >/dev/null; then
  failed=$((failed + 1)); report+=("cleanup  FAILED: a weft table exists in the ROOT namespace")
fi

echo
echo "==== summary (total $((SECONDS - total))s)"
printf '  %s\n' "${report[@]}"
echo "tiers: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
