#!/usr/bin/env bash
# Mesh benchmark (issue 9), one run, release build, each figure the median of 5 iperf3 runs
# of 3 s (TCP, one stream):
#
#   bare     a gotatun tunnel between two namespaces the benchmark sets up itself (weft-wg,
#            no agent, no policy, no VXLAN: the ceiling for userspace WireGuard here;
#            mesh/tests/wg_netns.rs bare_tunnel_throughput_median_of_5)
#   weft-wg  pod -> pod across nodes on the lab with encryption on (weft's encrypted path:
#            veth, forward hook with the policy engine, wgweft, weft-wg, underlay)
#   node     node 1 -> node 2's tunnel address over the same wgweft (no pod veths, no
#            forward hook): the forwarding path's share of the gap
#   vxlan    the same pods after both nodes' agents restarted with --encryption off (plain
#            VXLAN, the mixed-mode fallback)
#   handshake  mean control-connection handshake time, per node, from the agents' own
#            metrics (weft_mesh_handshake_duration_seconds: first hello to established, over
#            the lab's loaded start-up; the WireGuard handshake is not timed separately)
#
# Goal: weft's encrypted path >= 0.9 x the bare tunnel. Results in
# /tmp/weft-mt9-bench.txt; copy the figures into BENCHMARKS.md ("Mesh").
# Namespaces weft-mt9-*, lab dir /tmp/weft-lab-mesh-bench; torn down on every exit. Root.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB="$REPO/conformance/lab/lab.sh"
K8S="$REPO/conformance/k8s"
export WEFT_LAB_PREFIX=weft-mt9 WEFT_LAB_DIR=/tmp/weft-lab-mesh-bench WEFT_LAB_DEMO=0 \
  WEFT_LAB_ENCRYPTION=1 WEFT_LAB_PROFILE=release
P=$WEFT_LAB_PREFIX
DIR=$WEFT_LAB_DIR
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
CNI="$TARGET/release/weft-cni"
OUT=/tmp/weft-mt9-bench.txt
RUNS=5 SECS=3
BG=()
cleanup() {
  local p
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
  bash "$LAB" down >/dev/null 2>&1
}
trap cleanup EXIT
log() { printf '[mesh-bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
report() { echo "$*"; echo "$*" >>"$OUT"; }
kc() { bash "$K8S/cluster.sh" kubectl "$DIR/cluster" "$@"; }
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
: >"$OUT"
report "mesh bench $(date -u +%FT%TZ), $(nproc) cores, kernel $(uname -r), release build"

# --- bare tunnel (measured first and again last: the machine is shared) -----------------------
bare_tunnel() { # label
  log "bare weft-wg tunnel between two namespaces ($1; release build of the test)"
  bare=$(cd "$REPO" && WEFT_NETNS_PREFIX=weft-mt9-bare cargo test -q --release -p weft-mesh --test wg_netns \
    -- --ignored --nocapture bare_tunnel_throughput_median_of_5 2>&1 | grep 'bare weft-wg tunnel') || die "bare tunnel benchmark failed"
  BARE=$(sed -E 's/.*median ([0-9.]+).*/\1/' <<<"$bare")
  report "bare[gotatun tunnel, 2 namespaces, $1]: ${bare#*: }"
}
bare_tunnel first
BARE1=$BARE

# --- the lab -----------------------------------------------------------------------------------
log "lab up (release, encryption on)"
bash "$LAB" up 3 >/tmp/weft-mt9-bench-up.log 2>&1 || { tail -20 /tmp/weft-mt9-bench-up.log; die "lab up failed"; }
node() { echo "$P-node$1"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }
in_node() { local i=$1; shift; ip netns exec "$(node "$i")" "$@"; }
mesh() { in_node "$1" curl -sf "http://$(node_ip "$1"):6784/debug/mesh"; }
peer_is() { [[ $(mesh "$1" | jq -r --arg p "$(node "$2")" ".peers[] | select(.name == \$p) | .$3") == "$4" ]]; }
wait_until() { local secs=$1; shift; local d=$((SECONDS + secs)); until "$@" >/dev/null 2>&1; do ((SECONDS < d)) || return 1; sleep 0.5; done; }
kc create namespace mtb >/dev/null
wait_until 30 kc -n mtb get serviceaccount default
conf() { echo "{\"cniVersion\":\"1.1.0\",\"name\":\"weft\",\"type\":\"weft-cni\",\"agentSocket\":\"$DIR/run/node$1/agent.sock\",\"stateDir\":\"$DIR/run/node$1\"}"; }
make_pod() { # name node-index -> IPv4
  local name=$1 i=$2 uid result ip4
  kc create -f - >/dev/null <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"namespace":"mtb","name":"$name"},
 "spec":{"nodeName":"$(node "$i")","containers":[{"name":"main","image":"lab/none"}]}}
EOF
  uid=$(kc -n mtb get pod "$name" -o jsonpath='{.metadata.uid}')
  ip netns add "$P-pod-mtb-$name"
  ip -n "$P-pod-mtb-$name" link set lo up
  result=$(CNI_COMMAND=ADD CNI_CONTAINERID="mtb-$name" CNI_NETNS="/run/netns/$P-pod-mtb-$name" \
    CNI_IFNAME=eth0 CNI_PATH=/nonexistent CNI_ARGS="K8S_POD_NAMESPACE=mtb;K8S_POD_NAME=$name;K8S_POD_UID=$uid" \
    in_node "$i" "$CNI" <<<"$(conf "$i")") || die "ADD $name: $result"
  ip4=$(jq -r '[.ips[].address | select(contains(".")) | split("/")[0]][0]' <<<"$result")
  # As the kubelet does: a restarted agent learns the pod's address from the API.
  kc -n mtb patch pod "$name" --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip4\",\"podIPs\":[{\"ip\":\"$ip4\"}]}}" >/dev/null
  echo "$ip4"
}
encrypted() { peer_is 1 2 encryption wireguard && peer_is 2 1 encryption wireguard; }
wait_until 90 encrypted || die "node1 <-> node2 not encrypted in 90 s"
SERVER=$(make_pod server 2)
make_pod client 1 >/dev/null
ip netns exec "$P-pod-mtb-server" setsid iperf3 -s -B "$SERVER" >/dev/null 2>&1 </dev/null &
BG+=($!)
sleep 0.5
throughput() { # -> "median run1 ... (Mbit/s)"
  local r runs=""
  for ((r = 1; r <= RUNS; r++)); do
    runs+="$(ip netns exec "$P-pod-mtb-client" iperf3 -c "$SERVER" -t "$SECS" --connect-timeout 3000 -J | jq -r '.end.sum_received.bits_per_second / 1e6 | floor') "
    sleep 0.5
  done
  echo "$(tr ' ' '\n' <<<"$runs" | grep . | median) $runs"
}
log "pod -> pod across nodes, encrypted"
read -r ENC RUNS_ENC <<<"$(throughput)"
report "weft-wg[pod -> pod across nodes, encrypted]: median $ENC Mbit/s (runs: $RUNS_ENC)"
# The same tunnel between the nodes themselves (no pod veths, no forward hook): what the
# forwarding path costs on top of the tunnel.
T2=$(kc get node "$(node 2)" -o json | jq -r '.spec.podCIDRs[] | select(contains("."))' | sed 's|\.0/.*|.1|')
in_node 2 setsid iperf3 -s -B "$T2" -p 5202 >/dev/null 2>&1 </dev/null &
BG+=($!)
sleep 0.5
node_runs=""
for ((r = 1; r <= RUNS; r++)); do
  node_runs+="$(in_node 1 iperf3 -c "$T2" -p 5202 -t "$SECS" --connect-timeout 3000 -J | jq -r '.end.sum_received.bits_per_second / 1e6 | floor') "
  sleep 0.5
done
report "weft-wg[node -> node over wgweft, no forwarding]: median $(tr ' ' '\n' <<<"$node_runs" | grep . | median) Mbit/s (runs: $node_runs)"
hs() { in_node "$1" curl -sf "http://$(node_ip "$1"):6784/metrics" | awk '/^weft_mesh_handshake_duration_seconds_sum/ {s=$2} /^weft_mesh_handshake_duration_seconds_count/ {c=$2} END {printf "%.2f %d", (c ? s / c * 1000 : 0), c}'; }
for i in 1 2 3; do
  read -r ms n <<<"$(hs "$i")"
  report "handshake[control connection, node$i]: mean $ms ms over $n handshakes"
done

log "both nodes' agents restarted with --encryption off (plain VXLAN)"
for i in 1 2; do sed -i 's/--encryption on/--encryption off/' "$DIR/run/node$i/agent.cmd"; done
bash "$LAB" restart-agent 1 TERM 0 >/dev/null 2>&1
bash "$LAB" restart-agent 2 TERM 0 >/dev/null 2>&1
plain() { [[ $(in_node 1 ip -j route show "$(kc get node "$(node 2)" -o json | jq -r '.spec.podCIDRs[] | select(contains("."))')" | jq -r '.[0].dev') == vxweft ]]; }
wait_until 60 plain || die "node1 does not route node2's pods over vxweft"
read -r PLAIN RUNS_PLAIN <<<"$(throughput)"
report "vxlan[pod -> pod across nodes, plain]: median $PLAIN Mbit/s (runs: $RUNS_PLAIN)"
bare_tunnel "last (lab idle)"
report "ratio: weft encrypted / bare tunnel = $(awk -v a="$ENC" -v b="$BARE1" -v c="$BARE" 'BEGIN {printf "%.2f (first bare) / %.2f (last bare)", a / b, a / c}') (goal >= 0.9); encrypted / plain VXLAN = $(awk -v a="$ENC" -v b="$PLAIN" 'BEGIN {printf "%.2f", a / b}')"
