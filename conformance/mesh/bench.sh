#!/usr/bin/env bash
# Mesh benchmark (issue 9), one run, release build, TCP with one iperf3 stream, runs of 5 s
# (WEFT_BENCH_SECS):
#
#   bare     a weft-wg (gotatun) tunnel between two namespaces the benchmark sets up itself:
#            no agent, no policy, no VXLAN. Two of them:
#            - "same underlay" (the ceiling the goal is judged against): two namespaces
#              plugged into the lab's own underlay bridge, wgweft with the lab's MTU, measured
#              interleaved with weft's runs (bare, weft, node, bare, weft, node, ...), so both
#              see the same machine and the same underlay hops;
#            - "same underlay + kube-proxy": the same namespaces with kube-proxy's nft tables
#              (copied from node 1 and node 2) loaded for one run of each round: what the
#              nodes' kube-proxy costs any tunnel, so weft's own share can be read off;
#            - "same underlay, offloads off": a second pair with `weft-wg --offload off`
#              (each decrypted packet written to the TUN device alone and each datagram sent
#              alone, as stock gotatun does; the virtio-net header and the writer's batch
#              copy stay): what the offloads (mesh/src/gro.rs,
#              mesh/src/udp_gso.rs) gain any tunnel;
#            - "direct veth" (mesh/tests/wg_netns.rs bare_tunnel_throughput_median_of_5),
#              before the lab starts and after it stops: the machine's best case, for reference.
#   weft-wg  pod -> pod across nodes on the lab with encryption on (weft's encrypted path:
#            veth, forward hook with the policy engine, wgweft, weft-wg, underlay)
#   node     node 1 -> node 2's tunnel address over the same wgweft (no pod veths, no
#            forward hook): the forwarding path's share of any gap
#   vxlan    the same pods after both nodes' agents restarted with --encryption off (plain
#            VXLAN, the mixed-mode fallback)
#   handshake  mean control-connection handshake time, per node, from the agents' own
#            metrics (weft_mesh_handshake_duration_seconds: first hello to established, over
#            the lab's loaded start-up; the WireGuard handshake is not timed separately)
#
# Each figure is the median of RUNS (default 5; WEFT_BENCH_RUNS). Goal: weft's encrypted path
# >= 0.9 x the bare tunnel on the same underlay. Results in /tmp/weft-mt9-bench.txt; copy the
# figures into BENCHMARKS.md ("Mesh"). Namespaces weft-mt9-*, lab dir
# /tmp/weft-lab-mesh-bench; torn down on every exit. Root.
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
RUNS=${WEFT_BENCH_RUNS:-5} SECS=${WEFT_BENCH_SECS:-5}
BG=()
cleanup() {
  local p x
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
  for x in a b c d; do
    ip netns pids "$P-bare-$x" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$P-bare-$x" 2>/dev/null
  done
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
  log "bare weft-wg tunnel between two namespaces on a direct veth ($1; release build of the test)"
  bare=$(cd "$REPO" && WEFT_NETNS_PREFIX=weft-mt9-bare cargo test -q --release -p weft-mesh --test wg_netns \
    -- --ignored --nocapture bare_tunnel_throughput_median_of_5 2>&1 | grep 'bare weft-wg tunnel') || die "bare tunnel benchmark failed"
  BARE=$(sed -E 's/.*median ([0-9.]+).*/\1/' <<<"$bare")
  report "bare[gotatun tunnel, 2 namespaces on a direct veth, $1]: ${bare#*: }"
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
one_run() { # netns address [port] -> Mbit/s of one run
  ip netns exec "$1" iperf3 -c "$2" -p "${3:-5201}" -t "$SECS" --connect-timeout 3000 -J |
    jq -r '.end.sum_received.bits_per_second / 1e6 | floor'
}
runs_median() { tr ' ' '\n' <<<"$1" | grep . | median; }
throughput() { # -> "median run1 ... (Mbit/s)"
  local r runs=""
  for ((r = 1; r <= RUNS; r++)); do
    runs+="$(one_run "$P-pod-mtb-client" "$SERVER") "
    sleep 0.5
  done
  echo "$(runs_median "$runs") $runs"
}
# The same tunnel between the nodes themselves (no pod veths, no forward hook): what the
# forwarding path costs on top of the tunnel.
T2=$(kc get node "$(node 2)" -o json | jq -r '.spec.podCIDRs[] | select(contains("."))' | sed 's|\.0/.*|.1|')
in_node 2 setsid iperf3 -s -B "$T2" -p 5202 >/dev/null 2>&1 </dev/null &
BG+=($!)
# The bare tunnel on the same underlay: two namespaces plugged into the lab's bridge (as the
# nodes are), one weft-wg each with its own keys, wgweft with the lab's MTU. Two pairs: a/b
# with weft-wg as it runs on the nodes (offloads on), c/d with `--offload off` (every packet
# written and sent alone, as stock gotatun does): what the offloads gain any tunnel.
WG="$TARGET/release/weft-wg"
MTU=$(in_node 1 cat /sys/class/net/wgweft/mtu)
declare -A KEY PUB
bare_pair() { # x y host-octet-x host-octet-y offload
  local x=$1 y=$2 ox=$3 oy=$4 offload=$5 ns z
  for z in "$x" "$y"; do
    ns=$P-bare-$z
    ip netns add "$ns"
    ip -n "$P-host" link add "vbare$z" type veth peer name eth0 netns "$ns"
    ip -n "$P-host" link set "vbare$z" master br-underlay up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    KEY[$z]=$("$WG" genkey)
    PUB[$z]=$("$WG" pubkey <<<"${KEY[$z]}")
  done
  ip -n "$P-bare-$x" addr add "198.18.0.$ox/24" dev eth0
  ip -n "$P-bare-$y" addr add "198.18.0.$oy/24" dev eth0
  bare_conf "$x" "$y" "198.18.0.$oy" "198.19.0.$oy" >"$DIR/bare-$x.conf"
  bare_conf "$y" "$x" "198.18.0.$ox" "198.19.0.$ox" >"$DIR/bare-$y.conf"
  for z in "$x" "$y"; do
    ip netns exec "$P-bare-$z" setsid "$WG" run --config "$DIR/bare-$z.conf" --offload "$offload" >"$DIR/bare-$z.log" 2>&1 </dev/null &
    BG+=($!)
  done
  for z in "$x" "$y"; do
    wait_until 10 ip -n "$P-bare-$z" link show wgweft || die "bare tunnel: no wgweft in $P-bare-$z (log: $DIR/bare-$z.log)"
  done
  ip -n "$P-bare-$x" addr add "198.19.0.$ox/24" dev wgweft
  ip -n "$P-bare-$y" addr add "198.19.0.$oy/24" dev wgweft
  for z in "$x" "$y"; do ip -n "$P-bare-$z" link set wgweft mtu "$MTU" up; done
  ip netns exec "$P-bare-$y" setsid iperf3 -s -B "198.19.0.$oy" >/dev/null 2>&1 </dev/null &
  BG+=($!)
}
bare_conf() { # own peer peer-underlay peer-tunnel
  printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\n\n[Peer]\nPublicKey = %s\nEndpoint = %s:51820\nAllowedIPs = %s/32\n' \
    "${KEY[$1]}" "${PUB[$2]}" "$3" "$4"
}
bare_pair a b 201 202 on
bare_pair c d 203 204 off
sleep 0.5
# The same bare tunnel with kube-proxy's own tables (copied from node 1 and node 2) loaded in
# its namespaces for one run of each round: what the node's kube-proxy costs any tunnel here.
kube_proxy_tables() { # on|off
  local x src t
  for x in a b; do
    [[ $x == a ]] && src=1 || src=2
    for t in "ip kube-proxy" "ip6 kube-proxy"; do
      if [[ $1 == on ]]; then
        # shellcheck disable=SC2086 # family and name, two words
        in_node "$src" nft list table $t | ip netns exec "$P-bare-$x" nft -f - || die "copying $t into $P-bare-$x"
      else
        # shellcheck disable=SC2086
        ip netns exec "$P-bare-$x" nft delete table $t
      fi
    done
  done
}
log "interleaved, $RUNS rounds: bare tunnel on the same underlay (offloads on and off, with kube-proxy's tables), pod -> pod encrypted, node -> node"
bare_runs="" off_runs="" kp_runs="" enc_runs="" node_runs=""
for ((r = 1; r <= RUNS; r++)); do
  bare_runs+="$(one_run "$P-bare-a" 198.19.0.202) "
  sleep 0.5
  off_runs+="$(one_run "$P-bare-c" 198.19.0.204) "
  sleep 0.5
  kube_proxy_tables on
  kp_runs+="$(one_run "$P-bare-a" 198.19.0.202) "
  kube_proxy_tables off
  sleep 0.5
  enc_runs+="$(one_run "$P-pod-mtb-client" "$SERVER") "
  sleep 0.5
  node_runs+="$(one_run "$(node 1)" "$T2" 5202) "
  sleep 0.5
done
SAME=$(runs_median "$bare_runs") KP=$(runs_median "$kp_runs") ENC=$(runs_median "$enc_runs")
NODE=$(runs_median "$node_runs") OFF=$(runs_median "$off_runs")
report "bare[weft-wg tunnel (gotatun + offloads), 2 namespaces on the lab's underlay bridge, MTU $MTU]: median $SAME Mbit/s (runs: $bare_runs)"
report "bare, offloads off[the same with weft-wg --offload off: every packet written and sent alone]: median $OFF Mbit/s (runs: $off_runs)"
report "bare+kube-proxy[the same, with kube-proxy's nft tables of node 1 / node 2 loaded]: median $KP Mbit/s (runs: $kp_runs)"
report "weft-wg[pod -> pod across nodes, encrypted]: median $ENC Mbit/s (runs: $enc_runs)"
report "weft-wg[node -> node over wgweft, no forwarding]: median $NODE Mbit/s (runs: $node_runs)"
hs() { in_node "$1" curl -sf "http://$(node_ip "$1"):6784/metrics" | awk '/^weft_mesh_handshake_duration_seconds_sum/ {s=$2} /^weft_mesh_handshake_duration_seconds_count/ {c=$2} END {printf "%.2f %d", (c ? s / c * 1000 : 0), c}'; }
for i in 1 2 3; do
  read -r ms n <<<"$(hs "$i")"
  report "handshake[control connection, node$i]: mean $ms ms over $n handshakes"
done

# The echo probes through the tunnel under a saturated tunnel: no session judged silent.
alarms=$(cat "$DIR"/logs/agent-node*.log | grep -c "carries nothing" || true)
report "tunnel probes: $alarms silence alarm(s) in the agents' logs during the encrypted runs (expected 0)"
log "both nodes' agents restarted with --encryption off (plain VXLAN)"
for i in 1 2; do sed -i 's/--encryption on/--encryption off/' "$DIR/run/node$i/agent.cmd"; done
bash "$LAB" restart-agent 1 TERM 0 >/dev/null 2>&1
bash "$LAB" restart-agent 2 TERM 0 >/dev/null 2>&1
plain() { [[ $(in_node 1 ip -j route show "$(kc get node "$(node 2)" -o json | jq -r '.spec.podCIDRs[] | select(contains("."))')" | jq -r '.[0].dev') == vxweft ]]; }
wait_until 60 plain || die "node1 does not route node2's pods over vxweft"
read -r PLAIN RUNS_PLAIN <<<"$(throughput)"
report "vxlan[pod -> pod across nodes, plain]: median $PLAIN Mbit/s (runs: $RUNS_PLAIN)"
bare_tunnel "last (lab idle)"
report "ratio: weft encrypted / bare tunnel on the same underlay = $(awk -v a="$ENC" -v b="$SAME" 'BEGIN {printf "%.2f", a / b}') (goal >= 0.9)"
# The rounds are interleaved, so each round's pair saw the same machine: the median of the
# per-round ratios is steadier than the ratio of the medians when the machine drifts.
paired() { # runs-a runs-b -> "median (r1 r2 ...)"
  local r
  r=$(paste <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) | awk '{printf "%.2f\n", $1 / $2}')
  echo "$(median <<<"$r") ($(tr '\n' ' ' <<<"$r" | sed 's/ $//'))"
}
report "ratio per round (weft / bare in the same round), median: $(paired "$enc_runs" "$bare_runs")"
report "ratio, kube-proxy's share taken out: weft encrypted / bare tunnel with kube-proxy's tables = $(awk -v a="$ENC" -v b="$KP" 'BEGIN {printf "%.2f", a / b}'); node -> node / the same = $(awk -v a="$NODE" -v b="$KP" 'BEGIN {printf "%.2f", a / b}')"
report "for reference: weft encrypted / bare tunnel with offloads off = $(awk -v a="$ENC" -v b="$OFF" 'BEGIN {printf "%.2f", a / b}')"
report "for reference: weft encrypted / bare tunnel on a direct veth = $(awk -v a="$ENC" -v b="$BARE1" -v c="$BARE" 'BEGIN {printf "%.2f (before the lab) / %.2f (after)", a / b, a / c}'); encrypted / plain VXLAN = $(awk -v a="$ENC" -v b="$PLAIN" 'BEGIN {printf "%.2f", a / b}')"
