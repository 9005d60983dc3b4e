#!/usr/bin/env bash
# Dataplane and CNI benchmark on the lab (root; BENCHMARKS.md "Dataplane and CNI"):
#
#   bash conformance/lab/bench.sh            start a 3-node lab (release build, no demo), measure,
#                                            print the report, tear the lab down
#
# 1. CNI ADD to ready: WEFT_BENCH_PODS (200) pods created in the API on node 3, then one
#    `weft-cni` ADD each, exec'd as a runtime does (env + stdin), one after the other. ADD
#    returns only once the pod's addresses are in node 3's committed table. p50/p99 in ms.
# 2. New-connection rate (connect + RST close loop, WEFT_BENCH_SECONDS each, median of 5) from
#    a client pod on node 1 (same node) and on node 2 (across the VXLAN overlay) to a server pod
#    on node 1; with no policy, then with WEFT_BENCH_POLICIES (2000) NetworkPolicies of which
#    WEFT_BENCH_SELECTING (50) select the server (only one of them allows the benchmark port)
#    and the others select the ADD benchmark's pods (on node 3). Ratio.
# 3. TCP throughput (iperf3, 5 s) same node and across nodes, for the record; both conditions.
# 4. WEFT_BENCH_PODS_LATE (default 0: see BENCHMARKS.md) more ADDs on node 3, policies in force.
#
# Env: WEFT_LAB_DIR (default /tmp/weft-bench), CARGO_TARGET_DIR, WEFT_BENCH_OUT (report file).
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
K8S="$REPO/conformance/k8s"
export WEFT_LAB_DIR=${WEFT_LAB_DIR:-/tmp/weft-bench}
export WEFT_LAB_PROFILE=release WEFT_LAB_DEMO=0
DIR=$WEFT_LAB_DIR
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
NB="$TARGET/release/examples/netbench"
CNI="$TARGET/release/weft-cni"
PODS=${WEFT_BENCH_PODS:-200}
PODS_LATE=${WEFT_BENCH_PODS_LATE:-0}
POLICIES=${WEFT_BENCH_POLICIES:-2000}
SELECTING=${WEFT_BENCH_SELECTING:-50}
SECS=${WEFT_BENCH_SECONDS:-3}
RUNS=5
OUT=${WEFT_BENCH_OUT:-/dev/null}

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
kc() { bash "$K8S/cluster.sh" kubectl "$DIR/cluster" "$@"; }
report() { echo "$*"; echo "$*" >>"$OUT"; }
node_ns() { echo "weft-lab-node$1"; }
conf() { echo "{\"cniVersion\":\"1.1.0\",\"name\":\"weft\",\"type\":\"weft-cni\",\"agentSocket\":\"$DIR/run/node$1/agent.sock\",\"stateDir\":\"$DIR/run/node$1\"}"; }
state() { ip netns exec "$(node_ns "$1")" curl -s --unix-socket "$DIR/run/node$1/agent.sock" http://x/debug/state; }
max_rv() { kc -n bench get "$1" -o json | jq '[.items[].metadata.resourceVersion | tonumber] | max'; }
wait_applied() { # node kind rv
  local deadline=$((SECONDS + 300)) have
  while :; do
    have=$(state "$1" | jq -r ".kinds.$2.applied_resource_version // \"0\"")
    ((have >= $3)) && return 0
    ((SECONDS < deadline)) || die "node$1 did not apply $2 up to $3 (has $have)"
    sleep 0.2
  done
}

# WEFT_BENCH_KEEP=1 leaves the lab up afterwards (logs in $DIR/logs; `lab.sh down` removes it).
[[ ${WEFT_BENCH_KEEP:-0} == 1 ]] || trap 'log "tearing the lab down"; bash "$HERE/lab.sh" down >/dev/null 2>&1' EXIT
log "building the measuring tool"
(cd "$REPO" && cargo build -q --release -p weft-dataplane --example netbench)
log "lab: 3 nodes, release build, no demo"
bash "$HERE/lab.sh" up 3 >&2
kc create namespace bench >/dev/null
deadline=$((SECONDS + 30))
until kc -n bench get serviceaccount default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "no default ServiceAccount in bench"; sleep 0.5
done

# --- pods -------------------------------------------------------------------------------
pods_json() { # prefix count node-index -> a List of pods labelled like the policies expect
  python3 - "$@" <<'EOF'
import json, sys
prefix, n, node = sys.argv[1], int(sys.argv[2]), sys.argv[3]
items = [{
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"namespace": "bench", "name": f"{prefix}{i}",
                 "labels": {"app": f"bench-{i % 20}", "tier": f"t{i % 7}"}},
    "spec": {"nodeName": f"weft-lab-node{node}",
             "containers": [{"name": "main", "image": "lab/none",
                             "ports": [{"name": "http", "containerPort": 8080}]}]},
} for i in range(n)]
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
EOF
}
ADD_NODE=3
add_bench() { # prefix count label -> ADD latency of `count` new pods on node $ADD_NODE
  local prefix=$1 n=$2 label=$3 list rv
  pods_json "$prefix" "$n" "$ADD_NODE" | kc create -f - >/dev/null
  wait_applied "$ADD_NODE" pods "$(max_rv pods)"
  list=$(mktemp)
  kc -n bench get pods -o json | jq -r --arg p "$prefix" '.items[] | select(.metadata.name | test("^" + $p + "[0-9]+$")) | "bench \(.metadata.name) \(.metadata.uid)"' |
    while read -r ns name uid; do
      ip netns add "weft-lab-pod-bench-$name"
      echo "$ns $name $uid /run/netns/weft-lab-pod-bench-$name"
    done >"$list"
  conf "$ADD_NODE" >"$list.conf"
  log "CNI ADD of $n pods on node $ADD_NODE ($label)"
  local out
  out=$(ip netns exec "$(node_ns "$ADD_NODE")" "$NB" cni-add "$CNI" "$list.conf" "$list") || { echo "$out" | grep FAILED | sed -n 1,3p >&2; die "CNI ADD failed"; }
  report "cni_add[$label]: $(grep '^summary' <<<"$out")"
  rm -f "$list" "$list.conf"
}

make_pod() { # name node-index labels-json -> prints the pod's IPv4 address
  local name=$1 i=$2 labels=$3 uid result ip4
  kc create -f - >/dev/null <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"namespace":"bench","name":"$name","labels":$labels},
 "spec":{"nodeName":"weft-lab-node$i","containers":[{"name":"main","image":"lab/none"}]}}
EOF
  uid=$(kc -n bench get pod "$name" -o jsonpath='{.metadata.uid}')
  wait_applied "$i" pods "$(kc -n bench get pod "$name" -o jsonpath='{.metadata.resourceVersion}')"
  ip netns add "weft-lab-pod-bench-$name"
  ip -n "weft-lab-pod-bench-$name" link set lo up
  result=$(CNI_COMMAND=ADD CNI_CONTAINERID="bench-$name" CNI_NETNS="/run/netns/weft-lab-pod-bench-$name" \
    CNI_IFNAME=eth0 CNI_PATH=/nonexistent CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$name;K8S_POD_UID=$uid" \
    ip netns exec "$(node_ns "$i")" "$CNI" <<<"$(conf "$i")") || die "ADD $name: $result"
  ip4=$(jq -r '[.ips[].address | select(contains(".")) | split("/")[0]][0]' <<<"$result")
  kc -n bench patch pod "$name" --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip4\",\"podIPs\":[{\"ip\":\"$ip4\"}]}}" >/dev/null
  echo "$ip4"
}

# --- 1. ADD latency, no policies ---------------------------------------------------------
add_bench p "$PODS" "no policies, $PODS pods"

# --- server and clients ------------------------------------------------------------------
SERVER=$(make_pod server 1 '{"app":"server"}')
make_pod client1 1 '{"role":"client"}' >/dev/null
make_pod client2 2 '{"role":"client"}' >/dev/null
pod_exec() { local p=$1; shift; ip netns exec "weft-lab-pod-bench-$p" "$@"; }
pod_exec server setsid "$NB" serve 9000 >/dev/null 2>&1 </dev/null &
pod_exec server setsid iperf3 -s -p 5201 >/dev/null 2>&1 </dev/null &
sleep 0.5
log "server $SERVER on node 1; client1 on node 1, client2 on node 2"

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
rate() { # client -> "median run1 run2 ..." (connections/s over RUNS runs)
  local c=$1 r out runs=""
  for ((r = 1; r <= RUNS; r++)); do
    out=$(pod_exec "$c" "$NB" connect "$SERVER" 9000 "$SECS")
    runs+="$(awk '{print $1}' <<<"$out") "
    sleep 1
  done
  echo "$(tr ' ' '\n' <<<"$runs" | grep . | median) $runs"
}
throughput() { # client -> Gbit/s
  pod_exec "$1" iperf3 -c "$SERVER" -p 5201 -t 5 -J | jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | floor / 100'
}
measure() { # label -> sets SAME CROSS
  log "connection rate ($1): same node"
  read -r SAME RATES <<<"$(rate client1)"
  report "conn_rate[$1, same node]: median $SAME/s (runs: $RATES)"
  log "connection rate ($1): across nodes"
  read -r CROSS RATES <<<"$(rate client2)"
  report "conn_rate[$1, across nodes]: median $CROSS/s (runs: $RATES)"
  report "iperf3[$1, same node]: $(throughput client1) Gbit/s"
  report "iperf3[$1, across nodes]: $(throughput client2) Gbit/s"
}

# --- 2, 3. no policies -------------------------------------------------------------------
measure "no policies"
SAME0=$SAME CROSS0=$CROSS

# --- policies ----------------------------------------------------------------------------
log "creating $POLICIES NetworkPolicies ($SELECTING select the server)"
python3 - "$POLICIES" "$SELECTING" >"$DIR/policies.json" <<'EOF'
import json, sys
total, selecting = int(sys.argv[1]), int(sys.argv[2])
client = [{"podSelector": {"matchLabels": {"role": "client"}}}]
items = []
for k in range(selecting):
    # Only the last one allows the benchmark ports; the others allow the clients elsewhere.
    ports = [{"port": 9000}, {"port": 5201}] if k == selecting - 1 else [{"port": 7000 + k}]
    items.append({"metadata": {"name": f"server-{k}"},
                  "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                           "ingress": [{"from": client, "ports": ports}]}})
for j in range(total - selecting):
    sel = {"matchLabels": {"app": f"bench-{j % 20}"}}
    kind = j % 4
    if kind == 0:
        spec = {"podSelector": sel, "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"app": f"bench-{(j + 1) % 20}"}}}],
            "ports": [{"port": 8000 + j % 500}]}]}
    elif kind == 1:
        spec = {"podSelector": sel, "ingress": [{
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "bench"}},
                      "podSelector": {"matchLabels": {"tier": f"t{j % 7}"}}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": "http"}]}]}
    elif kind == 2:
        spec = {"podSelector": sel, "ingress": [{
            "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{j % 250}.0.0/16"]}}],
            "ports": [{"port": 1000, "endPort": 2000 + j % 100}]}]}
    else:
        spec = {"podSelector": sel, "policyTypes": ["Ingress", "Egress"], "ingress": [],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": f"bench-{(j + 3) % 20}"}}}],
                            "ports": [{"port": 443}]}]}
    items.append({"metadata": {"name": f"other-{j}"}, "spec": spec})
for it in items:
    it.update({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy"})
    it["metadata"]["namespace"] = "bench"
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
EOF
started=$SECONDS
kc create -f "$DIR/policies.json" >/dev/null
rv=$(max_rv networkpolicies)
wait_applied 1 networkpolicies "$rv"
wait_applied 2 networkpolicies "$rv"
log "policies created and applied on nodes 1 and 2 in $((SECONDS - started)) s"
report "node1 table (sets, elements, chains, rules): $(state 1 | jq -c '[.table.sets, .table.elements, .table.chains, .table.rules]' 2>/dev/null || echo '?')"
# The policies are in force: a pod that is not a client (p0, on node 3) no longer connects.
if pod_exec p0 "$NB" connect "$SERVER" 9000 0.5 2>/dev/null | awk 'NR == 1 {r = !($2 == 0)} END {exit r}'; then
  report "check: a non-client pod is refused by the server's policies (ok)"
else
  report "check: a non-client pod still connects: the policies are NOT in force"
fi

measure "$POLICIES policies, $SELECTING select the server"
report "conn_rate ratio (policies / none): same node $(awk -v a="$SAME" -v b="$SAME0" 'BEGIN{printf "%.3f", a/b}'), across nodes $(awk -v a="$CROSS" -v b="$CROSS0" 'BEGIN{printf "%.3f", a/b}')"

# --- 4. ADD latency with the policies in force --------------------------------------------
((PODS_LATE > 0)) && add_bench q "$PODS_LATE" "$POLICIES policies, $PODS_LATE more pods"
log "done"
