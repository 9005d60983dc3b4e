#!/usr/bin/env bash
# The lab as a test: bring it up, check the demo's truth table against the one the policies
# mean (conformance/lab/expected-table.txt, cross-checked with `weft demo`'s evaluator by
# hand), check the ruleset with an independent reader, and always tear down.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/tmp/weft-lab-test}
out=$(mktemp)
trap 'bash "$HERE/lab.sh" down >/dev/null 2>&1; rm -f "$out" "$out.err" "$out.x"' EXIT
passed=0; failed=0
check() { if "$@"; then passed=$((passed + 1)); echo "ok   $*"; else failed=$((failed + 1)); echo "FAIL $*"; fi; }

bash "$HERE/lab.sh" up 3 >"$out" 2>"$out.err" || { cat "$out.err"; echo "lab-test: 0 passed, 1 failed"; exit 1; }
only_tables() { awk '/^TCP /{p=1} /^Look around/{p=0} p' | grep -v '^$'; }
table() { only_tables <"$out"; }
same_table() { diff <(table) "$HERE/expected-table.txt"; }
check same_table
# The independent reader: nft itself parses the table the agent wrote, with comments naming policies.
rules_named() { ip netns exec weft-lab-node1 nft -j list table inet weft | jq -e '[.nftables[] | .rule? | select(.) | .comment? // empty | select(startswith("shop/api-from-ui ingress[1] from[0]"))] | length >= 1' >/dev/null; }
check rules_named
# A second probe round gives the same answers (no flapping).
second_round() { diff <(bash "$HERE/lab.sh" table 2>/dev/null | only_tables) "$HERE/expected-table.txt"; }
check second_round
# The operator's tools against node 1's agent.
W=${CARGO_TARGET_DIR:-$HERE/../../target}/debug/weft
S=$WEFT_LAB_DIR/run/node1/agent.sock
explained_allowed() { "$W" explain clients/ui shop/api 8080/tcp --socket "$S" | grep -q 'allowed by shop/api-from-ui ingress\[0\]'; }
check explained_allowed
explained_denied() {
  "$W" explain clients/batch shop/api 8080/tcp --socket "$S" >"$out.x"
  grep -q 'DENIED: isolated by shop/api-from-ui' "$out.x" && grep -q 'enforces the same: the ruleset drops' "$out.x"
}
check explained_denied
audit_clean() { "$W" audit --socket "$S" >/dev/null; }
check audit_clean
drift_repaired() {
  local ip; ip=$(awk '{print $1}' "$WEFT_LAB_DIR/pods/shop_api.ips")
  ip netns exec weft-lab-node1 nft delete element inet weft pods-local-v4 "{ $ip }" || return 1
  "$W" audit --socket "$S" >/dev/null && return 1   # must report drift (exit 1)
  "$W" audit --repair --socket "$S" >"$out.x"   # exit 1: it reports the drift it repaired
  grep -q "add element pods-local-v4" "$out.x" || return 1
  "$W" audit --socket "$S" >/dev/null
}
check drift_repaired
echo "lab-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
