#!/usr/bin/env bash
# weft's main job for a person: `sudo ./scripts/lab.sh`. Installs what it needs, builds weft,
# and runs the lab. Until the multi-node lab lands (issue 7) this is the engine demo: a small
# cluster compiled to nftables, every node's ruleset, and the connectivity truth table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${WEFT_CACHE:-/var/cache/weft}/target}"
echo "[lab] building weft (first time: about 2 minutes)"
cargo build -q --bin weft
exec "$CARGO_TARGET_DIR/debug/weft" demo "$@"
