#!/usr/bin/env bash
# The lab as a test: bring it up, check the demo's truth table against the one the policies
# mean (conformance/lab/expected-table.txt, cross-checked with `weft demo`'s evaluator by
# hand), check the ruleset with an independent reader, and always tear down.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/tmp/weft-lab-test}
P=${WEFT_LAB_PREFIX:-weft-lab}
out=$(mktemp)
trap 'bash "$HERE/lab.sh" down >/dev/null 2>&1; rm -f "$out" "$out.err" "$out.x"' EXIT
passed=0; failed=0
check() { if "$@"; then passed=$((passed + 1)); echo "ok   $*"; else failed=$((failed + 1)); echo "FAIL $*"; fi; }

# The drop log on (off by default) for the flows-and-drops checks below.
export WEFT_AGENT_ARGS="${WEFT_AGENT_ARGS:-} --log-drops"
bash "$HERE/lab.sh" up 3 >"$out" 2>"$out.err" || { cat "$out.err"; echo "lab-test: 0 passed, 1 failed"; exit 1; }
only_tables() { awk '/^TCP /{p=1} /^Look around/{p=0} p' | grep -v '^$'; }
table() { only_tables <"$out"; }
same_table() { diff <(table) "$HERE/expected-table.txt"; }
check same_table
# The independent reader: nft itself parses the table the agent wrote, with comments naming policies.
rules_named() { ip netns exec $P-node1 nft -j list table inet weft | jq -e '[.nftables[] | .rule? | select(.) | .comment? // empty | select(startswith("shop/api-from-ui ingress[1] from[0]"))] | length >= 1' >/dev/null; }
check rules_named
# A second probe round gives the same answers (no flapping).
second_round() { diff <(bash "$HERE/lab.sh" table 2>/dev/null | only_tables) "$HERE/expected-table.txt"; }
check second_round
# The operator's tools against node 1's agent.
W=${CARGO_TARGET_DIR:-$HERE/../../target}/debug/weft
S=$WEFT_LAB_DIR/run/node1/agent.sock
explained_allowed() { "$W" explain clients/ui shop/api 8080/tcp --socket "$S" | grep 'allowed by shop/api-from-ui ingress\[0\]' >/dev/null; }
check explained_allowed
explained_denied() {
  "$W" explain clients/batch shop/api 8080/tcp --socket "$S" >"$out.x"
  grep -q 'DENIED: isolated by shop/api-from-ui' "$out.x" && grep -q 'enforces the same: the ruleset drops' "$out.x"
}
check explained_denied
audit_clean() { "$W" audit --socket "$S" >/dev/null; }
check audit_clean
# Drift: someone else's commit to weft's table (here `nft`) is seen by the agent's nftables
# monitor and repaired by a diff within seconds, counted, with the periodic check (60 s) far
# away. `weft audit` then finds the table clean.
node1_metric() { ip netns exec $P-node1 curl -s --max-time 2 "http://198.18.0.11:6784/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
drift_repaired_by_the_agent() {
  local ip before i
  ip=$(awk '{print $1}' "$WEFT_LAB_DIR/pods/shop_api.ips")
  before=$(node1_metric weft_ruleset_drift_repairs_total)
  ip netns exec $P-node1 nft delete element inet weft pods-local-v4 "{ $ip }" || return 1
  for i in $(seq 50); do  # 5 s at most
    ip netns exec $P-node1 nft -j list set inet weft pods-local-v4 | jq -e --arg ip "$ip" '[.. | strings] | index($ip)' >/dev/null && break
    sleep 0.1
  done
  ip netns exec $P-node1 nft -j list set inet weft pods-local-v4 | jq -e --arg ip "$ip" '[.. | strings] | index($ip)' >/dev/null || { echo "element $ip not put back"; return 1; }
  [ "$(node1_metric weft_ruleset_drift_repairs_total)" -gt "$before" ] || { echo "repair not counted"; return 1; }
  [ "$(node1_metric weft_nft_foreign_commits_total)" -ge 1 ] || { echo "foreign commit not counted"; return 1; }
  grep -q 'another process changed weft' "$WEFT_LAB_DIR/logs/agent-node1.log" || { echo "no log line"; return 1; }
  "$W" audit --socket "$S" >/dev/null
}
check drift_repaired_by_the_agent
# Masquerade (table inet weft-nat): a pod reaching outside the cluster CIDRs (198.18.0.1, the
# lab's host namespace on the underlay, which has no route to the pods) arrives as its node;
# pod -> pod (node 2's ui -> node 1's api on 8085, allowed by api-from-ui) keeps the pod source.
# Each listener answers with the peer address it saw.
peer_seen() { # client-netns server-netns addr port -> prints the peer address the server saw
  local pid got
  ip netns exec "$2" timeout 10 socat "TCP-LISTEN:$4,reuseaddr" SYSTEM:'echo $SOCAT_PEERADDR' >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 20); do
    got=$(ip netns exec "$1" socat -T2 - "TCP:$3:$4,connect-timeout=2" </dev/null 2>/dev/null) && break
    sleep 0.2
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  echo "$got"
}
outside_is_masqueraded() {
  local seen; seen=$(peer_seen $P-pod-shop-api $P-host 198.18.0.1 19999)
  [[ $seen == 198.18.0.11 ]] || { echo "  host saw $seen, want node1's 198.18.0.11"; return 1; }
  ip netns exec $P-node1 nft list table inet weft-nat | grep 'ip saddr @cluster-v4 ip daddr != @cluster-v4 counter packets [1-9]' >/dev/null
}
check outside_is_masqueraded
pod_to_pod_keeps_its_source() {
  local ui seen; ui=$(awk '{print $1}' "$WEFT_LAB_DIR/pods/clients_ui.ips")
  seen=$(peer_seen $P-pod-clients-ui $P-pod-shop-api "$(awk '{print $1}' "$WEFT_LAB_DIR/pods/shop_api.ips")" 8085)
  [[ $seen == "$ui" ]] || { echo "  api saw $seen, want ui's $ui"; return 1; }
}
check pod_to_pod_keeps_its_source
# The conflist was written once the agent was ready, naming the socket and state dir it uses.
conflist_names_the_agent() {
  jq -e --arg s /run/weft/agent.sock '.plugins[0].agentSocket == $s and .plugins[1].type == "portmap"' \
    "$WEFT_LAB_DIR/run/node1/net.d/10-weft.conflist" >/dev/null
}
check conflist_names_the_agent
# Flows and drops, read on node 1 (the agents run with --log-drops): an allowed long-lived
# connection ui -> api:8080 is listed by `weft flows` with the policy rule that admitted it
# (from its conntrack mark); a denied one batch -> api:8080 shows in `weft status --drops` with
# the isolating policy, and in the agent's weft_drops_logged_total.
api_ip() { awk '{print $1}' "$WEFT_LAB_DIR/pods/shop_api.ips"; }
flow_names_its_rule() {
  local pid json i found=1
  ip netns exec $P-pod-clients-ui timeout 20 socat -T20 - "TCP:$(api_ip):8080,connect-timeout=2" </dev/null >/dev/null 2>&1 &
  pid=$!
  for i in $(seq 1 25); do  # the connection is up within moments; 5 s at most
    sleep 0.2
    json=$(ip netns exec $P-node1 "$W" flows --json)
    jq -e --arg ip "$(api_ip)" '[.flows[] | select(.dst == $ip and .dport == 8080)
        | .admitted_by.ingress.rules[]? | select(startswith("shop/api-from-ui ingress[0]"))] | length >= 1' <<<"$json" >/dev/null \
      && { found=0; break; }
  done
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  ((found == 0)) || { echo "  flows: $(head -c 600 <<<"$json")"; return 1; }
}
check flow_names_its_rule
drop_shown_with_its_policy() {
  local before json i batch
  batch=$(awk '{print $1}' "$WEFT_LAB_DIR/pods/clients_batch.ips")
  before=$(node1_metric weft_drops_logged_total)
  ip netns exec $P-pod-clients-batch socat -T1 - "TCP:$(api_ip):8080,connect-timeout=1" </dev/null >/dev/null 2>&1 && { echo "  batch reached api"; return 1; }
  for i in $(seq 1 30); do  # the agent writes its drop file at most once a second
    json=$(ip netns exec $P-node1 "$W" status --drops --json --socket "$S")
    jq -e --arg src "$batch" --arg dst "$(api_ip)" '[.drop_log.recent[]? | select(.src == $src and .dst == $dst and .dport == 8080
        and (.isolated_by | tostring | contains("shop/api-from-ui")))] | length >= 1' <<<"$json" >/dev/null && break
    sleep 0.2
  done
  jq -e --arg src "$batch" '[.drop_log.recent[]? | select(.src == $src)] | length >= 1' <<<"$json" >/dev/null \
    || { echo "  status --drops: $(head -c 600 <<<"$json")"; return 1; }
  [ "$(node1_metric weft_drops_logged_total)" -gt "${before:-0}" ] || { echo "  weft_drops_logged_total did not move"; return 1; }
}
check drop_shown_with_its_policy
status_names_modes() {
  "$W" status --socket "$S" >"$out.x" || return 1
  grep -q '^modes: conntrack marks: ingress rule ids in bits 8-19.*drop log on' "$out.x" \
    && grep -qE '^enforcing: [1-3] of 3 policies have rules here; [0-9]+ pods known, local pod addresses 2 IPv4' "$out.x" \
    && grep -q '^mesh: ' "$out.x" || { cat "$out.x"; return 1; }
}
check status_names_modes
# hostPort: the conflist the agent wrote chains the reference `portmap` plugin. Run it as node
# 1's kubelet would: libcni's cnitool in node 1's own view (the agent's mount namespace, where
# /etc/cni/net.d, /opt/cni/bin and /run/weft are node 1's, and its network namespace), with
# portmap installed beside weft-cni. A client outside the cluster reaches the pod through node
# 1's address; CNI DEL removes the mapping (both read with nft, the independent reader).
REPO=$(cd "$HERE/../.." && pwd)
kc() { bash "$REPO/conformance/k8s/cluster.sh" kubectl "$WEFT_LAB_DIR/cluster" "$@"; }
HP_NS=$P-pod-hostport-web
node1_has_30080() { ip netns exec $P-node1 nft -j list ruleset | jq -e '[.. | numbers | select(. == 30080)] | length > 0' >/dev/null; }
node1_cni() { # add|del
  CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=hostport;K8S_POD_NAME=web;K8S_POD_UID=$HP_UID" \
    CAP_ARGS='{"portMappings":[{"hostPort":30080,"containerPort":8080,"protocol":"tcp"}]}' \
    nsenter -t "$(cat "$WEFT_LAB_DIR/pids/agent-node1.pid")" -m -n \
    env NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin CNI_IFNAME=eth0 "$CNITOOL" "$1" weft "/run/netns/$HP_NS"
}
hostport_reaches_the_pod() {
  local portmap res ip got i
  CNITOOL=$(bash "$REPO/conformance/cni/install-cnitool.sh") || return 1
  portmap=$(bash "$REPO/conformance/cni/install-cnitool.sh" --portmap) || return 1
  cp "$portmap" "$WEFT_LAB_DIR/run/node1/cni-bin/portmap"  # the node's CNI plugin directory
  kc create namespace hostport >/dev/null || return 1
  kc -n hostport apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: $P-node1
  containers: [{name: main, image: lab/none, ports: [{containerPort: 8080, hostPort: 30080, protocol: TCP}]}]
EOF
  HP_UID=$(kc -n hostport get pod web -o jsonpath='{.metadata.uid}')
  ip netns add "$HP_NS" && ip -n "$HP_NS" link set lo up || return 1
  node1_has_30080 && { echo "  a mapping for 30080 exists before ADD"; return 1; }
  res=$(node1_cni add 2>&1) || { echo "  cnitool add: $res"; return 1; }
  ip=$(jq -r '[.ips[].address | split("/")[0] | select(contains(":") | not)][0]' <<<"$res")
  kc -n hostport patch pod web --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip\",\"podIPs\":[{\"ip\":\"$ip\"}],\"hostIP\":\"198.18.0.11\"}}" >/dev/null
  ip netns exec "$HP_NS" timeout 30 socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo hostport-ok' >/dev/null 2>&1 &
  HP_SERVER=$!
  for i in $(seq 1 25); do
    got=$(ip netns exec $P-host socat -T2 - TCP:198.18.0.11:30080,connect-timeout=2 </dev/null 2>/dev/null) && [[ $got == hostport-ok ]] && break
    sleep 0.2
  done
  [[ $got == hostport-ok ]] || { echo "  198.18.0.11:30080 from outside answered '${got:-nothing}'"; return 1; }
  node1_has_30080 || { echo "  no mapping for 30080 in node 1's ruleset"; return 1; }
  res=$(node1_cni del 2>&1) || { echo "  cnitool del: $res"; return 1; }
  node1_has_30080 && { echo "  the mapping for 30080 survived DEL"; return 1; }
  # The server still listens in the pod: only the mapping is gone.
  got=$(ip netns exec $P-host socat -T1 - TCP:198.18.0.11:30080,connect-timeout=1 </dev/null 2>/dev/null)
  kill "$HP_SERVER" 2>/dev/null; wait "$HP_SERVER" 2>/dev/null
  [[ $got != hostport-ok ]] || { echo "  still reachable after DEL"; return 1; }
  return 0
}
check hostport_reaches_the_pod
echo "lab-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
