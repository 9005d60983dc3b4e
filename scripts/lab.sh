#!/usr/bin/env bash
# weft's main job for a person: `./scripts/lab.sh` starts the lab: a 3-node cluster in
# network namespaces (real etcd, kube-apiserver, controller-manager, kube-proxy; one weft agent
# per node; pods attached by weft-cni), a small demo with policies, and its truth table.
# The first run builds what it needs (Kubernetes components: several minutes, cached under
# /var/cache/weft); later runs take about 30 s. `./scripts/lab.sh down` removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
[ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${WEFT_CACHE:-/var/cache/weft}/target}"
case "${1:-up}" in
  up) exec bash conformance/lab/lab.sh up "${2:-3}" ;;
  *) exec bash conformance/lab/lab.sh "$@" ;;
esac
