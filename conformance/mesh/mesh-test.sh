#!/usr/bin/env bash
# The mesh and encryption on the lab (issue 9): three nodes with WEFT_LAB_ENCRYPTION=1 (every
# agent runs the mesh with --encryption on, one weft-wg per node), pods attached by the real
# weft-cni, and checks against the kernel and the wire:
#
#   0. the cluster secret reaches each agent the DaemonSet's way: the lab created the Secret
#      kube-system/weft-mesh, manifest-agent.sh mounted it (read-only, 0400) where the agent's
#      --mesh-secret-file points, in the agent's own mount namespace only; the agent says it read
#      the file; the value is in no agent's command line, environment or log
#   1. every node authenticates every other, routes their podCIDRs over wgweft (ip -j route)
#   2. pod <-> pod TCP across nodes works; an underlay capture (tcpdump on the lab's bridge)
#      carries no plaintext of a marker sent between pods, while a capture on the receiving
#      node's wgweft (the control) does; WireGuard UDP is what the underlay carries
#   3. a NetworkPolicy still judges traffic that arrives over wgweft (allowed source passes,
#      another is refused)
#   4. a fake peer sending a malformed frame and an oversized length prefix to the mesh port is
#      disconnected and counted (weft_mesh_protocol_violations_total); the node is unaffected
#   5. node1 <-> node3 blocked on the underlay (nft in node1's namespace): both switch to the
#      relay through node2 (/debug/mesh, WireGuard AllowedIPs), pods still reach each other,
#      every other pair stays direct; unblocked: direct again
#   5b. WireGuard's UDP port blocked between node1 and node3 (control TCP open) and node3's
#      weft-wg restarted (no session left): node3 reports node1 (weft_mesh_wireguard_failing_peers,
#      /debug/mesh, log naming the port), its route to node1 stays on wgweft (no plaintext),
#      both relay through node2, pods reach each other; unblocked: a session, direct again
#   5c. WireGuard's UDP port blocked between node1 and node3 while their session is up (control
#      TCP open, nothing restarted): the session carries nothing, which WireGuard would notice
#      only at its expiry (180 s); the agents' echo probes through the tunnel see it: both ends
#      report it (weft_mesh_wireguard_silent_peers, /debug/mesh, a log line naming the port) and
#      relay through node2 within seconds; node3's tunnel address stays in node3's own
#      AllowedIPs (the probes keep judging the direct session); pods reach each other;
#      unblocked: direct again
#   6. mixed mode: node3's agent restarted with --encryption off: the others route it over
#      vxweft, the rest stays on wgweft, traffic flows both ways; blocked again, node3's route
#      to node1 goes via node2's tunnel address (ip -j route), unblocked: direct again
#   6c. --encryption required on node1: node3 (encryption off) unreachable from node1 instead
#      of plain VXLAN, and node3's plain VXLAN dropped by node1 (table inet weft-guard, its
#      counter), node2 encrypted; node1's weft-wg stopped: node2 unreachable from node1
#      too and no VXLAN from node1 on the underlay; weft-wg back: encrypted again
#   7. a wrong cluster secret on node3: the Secret replaced in the API and only node3's agent
#      restarted (its volume gets the new value at its start; the others keep the secret they
#      read at theirs: a rotation half rolled out): node3 refused by the others (log line,
#      weft_mesh_refused_peers, handshake failures cluster_secret_mismatch), its podCIDR
#      unreachable from them (route type unreachable), pods cut off; node1 <-> node2
#      unaffected; the Secret restored afterwards
#   8. where the wireguard kernel module is loaded (not on this project's machines: the test
#      says it skips): node1 switched to --wireguard kernel, encrypted traffic to node2
#
# Namespaces weft-mt9-*, lab dir /tmp/weft-lab-mesh; torn down on every exit. Needs root.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB="$REPO/conformance/lab/lab.sh"
K8S="$REPO/conformance/k8s"
export WEFT_LAB_PREFIX=weft-mt9 WEFT_LAB_DIR=/tmp/weft-lab-mesh WEFT_LAB_DEMO=0 WEFT_LAB_ENCRYPTION=1
P=$WEFT_LAB_PREFIX
DIR=$WEFT_LAB_DIR
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
CNI="$TARGET/debug/weft-cni"
T=$(mktemp -d /tmp/weft-mt9.XXXXXX)
BG=()
cleanup() {
  local p
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null; done
  ip netns exec "$P-node1" nft delete table inet weft-mt9-block 2>/dev/null
  bash "$LAB" down >/dev/null 2>&1
  rm -rf "$T"
}
trap cleanup EXIT
passed=0; failed=0
check() { if "$@"; then passed=$((passed + 1)); echo "ok   $*"; else failed=$((failed + 1)); echo "FAIL $*"; fi; }
log() { printf '[mesh-test %s] %s\n' "$(date +%T)" "$*" >&2; }
kc() { bash "$K8S/cluster.sh" kubectl "$DIR/cluster" "$@"; }
finish() { echo "mesh-test: $passed passed, $failed failed"; [[ $failed == 0 ]]; exit $?; }

# Waits until "$@" succeeds: seconds, command... (returns 1 on timeout; bounded in time)
wait_until() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

node() { echo "$P-node$1"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }
in_node() { local i=$1; shift; ip netns exec "$(node "$i")" "$@"; }
mesh() { in_node "$1" curl -sf "http://$(node_ip "$1"):6784/debug/mesh"; }
metrics() { in_node "$1" curl -sf "http://$(node_ip "$1"):6784/metrics"; }
# peer field: node-index peer-index jq-field
# One sample's value from a node's /metrics (NAME with its labels, as the agent writes it).
metric_value() { metrics "$1" | awk -v m="$2" '$1 == m {print $2}'; }
peer() { mesh "$1" | jq -r --arg p "$(node "$2")" ".peers[] | select(.name == \$p) | .$3"; }
peer_is() { [[ $(peer "$1" "$2" "$3") == "$4" ]]; }
cidr4() { kc get node "$(node "$1")" -o json | jq -r '.spec.podCIDRs[] | select(contains("."))'; }
tunnel4() { local c; c=$(cidr4 "$1"); echo "${c%.0/*}.1"; }
route_json() { in_node "$1" ip -j route show "$(cidr4 "$2")"; }
route_dev() { [[ $(route_json "$1" "$2" | jq -r '.[0].dev // empty') == "$3" ]]; }
route_gw() { [[ $(route_json "$1" "$2" | jq -r '.[0].gateway // empty') == "$3" ]]; }
route_type() { [[ $(route_json "$1" "$2" | jq -r '.[0].type // "unicast"') == "$3" ]]; }

log "lab up (3 nodes, encryption on)"
if ! bash "$LAB" up 3 >"$T/up.log" 2>&1; then
  tail -30 "$T/up.log"; failed=1; finish
fi
for i in 1 2 3; do C[$i]=$(cidr4 "$i"); done

# --- 0. the cluster secret: the Secret, mounted as a file ---------------------------------------
agent_pid() { cat "$DIR/pids/agent-node$1.pid"; }
# --mesh-secret-file's value on the agent's command line (the DaemonSet's arg).
secret_file() { tr '\0' '\n' <"/proc/$(agent_pid "$1")/cmdline" | sed -n 's/^--mesh-secret-file=//p' | tail -1; }
api_secret() { kc -n kube-system get secret weft-mesh -o json | jq -r '.data.secret' | base64 -d; }
api_secret >"$T/secret-api"
# What the agent's own mount namespace holds at that path.
mounted_secret_is() { # node-index file
  local f; f=$(secret_file "$1")
  [[ -n $f ]] && cmp -s "/proc/$(agent_pid "$1")/root$f" "$2"
}
mounted_0400_read_only() {
  local f pid; f=$(secret_file "$1"); pid=$(agent_pid "$1")
  [[ $(stat -L -c %a "/proc/$pid/root$f") == 400 ]] &&
    awk -v m="$(dirname "$f")" '$5 == m {print $6}' "/proc/$pid/mountinfo" | grep '^ro\(,\|$\)' >/dev/null
}
# The machine's (the test's) mount namespace has no such mount and no such file.
not_in_root_mount_ns() { local f; f=$(secret_file 1); [[ ! -e $f ]] && ! awk -v m="$(dirname "$f")" '$5 == m {f = 1} END {exit !f}' /proc/self/mountinfo; }
said_it_read_the_file() { grep -q "mesh: the cluster secret is read from the file" "$DIR/logs/agent-node$1.log"; }
# The value is in no argv, environment or log of the agent (nor the argv the lab recorded).
secret_not_exposed() {
  local v pid; v=$(tr -d '\n' <"$T/secret-api"); pid=$(agent_pid "$1")
  [[ ${#v} -ge 16 ]] || return 1
  ! tr '\0' '\n' <"/proc/$pid/cmdline" | grep -F -- "$v" >/dev/null &&
    ! tr '\0' '\n' <"/proc/$pid/environ" | grep -F -- "$v" >/dev/null &&
    ! grep -qF -- "$v" "$DIR/run/node$1/agent.cmd" "$DIR/logs/agent-node$1.log"
}
lab_secret_is_the_apis() { cmp -s "$T/secret-api" "$DIR/mesh-secret"; }
check lab_secret_is_the_apis
for i in 1 2 3; do
  check mounted_secret_is "$i" "$T/secret-api"
  check mounted_0400_read_only "$i"
  check said_it_read_the_file "$i"
  check secret_not_exposed "$i"
done
check not_in_root_mount_ns

# --- pods: API object, netns, weft-cni ADD, status ------------------------------------------
kc create namespace mt >/dev/null
wait_until 30 kc -n mt get serviceaccount default
conf() { echo "{\"cniVersion\":\"1.1.0\",\"name\":\"weft\",\"type\":\"weft-cni\",\"agentSocket\":\"$DIR/run/node$1/agent.sock\",\"stateDir\":\"$DIR/run/node$1\"}"; }
pod_ns() { echo "$P-pod-mt-$1"; }
in_pod() { local p=$1; shift; ip netns exec "$(pod_ns "$p")" "$@"; }
make_pod() { # name node-index labels-json -> prints the pod's IPv4 address
  local name=$1 i=$2 labels=$3 uid result ip4 try
  kc create -f - >/dev/null <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"namespace":"mt","name":"$name","labels":$labels},
 "spec":{"nodeName":"$(node "$i")","containers":[{"name":"main","image":"lab/none"}]}}
EOF
  uid=$(kc -n mt get pod "$name" -o jsonpath='{.metadata.uid}')
  ip netns add "$(pod_ns "$name")"
  ip -n "$(pod_ns "$name")" link set lo up
  for try in 1 2 3; do
    result=$(CNI_COMMAND=ADD CNI_CONTAINERID="mt-$name" CNI_NETNS="/run/netns/$(pod_ns "$name")" \
      CNI_IFNAME=eth0 CNI_PATH=/nonexistent CNI_ARGS="K8S_POD_NAMESPACE=mt;K8S_POD_NAME=$name;K8S_POD_UID=$uid" \
      in_node "$i" "$CNI" <<<"$(conf "$i")") && break
    log "ADD $name (try $try): $result"; sleep 1
  done
  ip4=$(jq -r '[.ips[].address | select(contains(".")) | split("/")[0]][0]' <<<"$result")
  kc -n mt patch pod "$name" --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip4\",\"podIPs\":[{\"ip\":\"$ip4\"}]}}" >/dev/null
  echo "$ip4"
}
A=$(make_pod a 1 '{"role":"allowed"}')
B=$(make_pod b 2 '{"app":"server"}')
C=$(make_pod c 3 '{"role":"other"}')
log "pods a=$A (node1) b=$B (node2) c=$C (node3)"
for p in a b c; do
  in_pod "$p" setsid socat TCP-LISTEN:7000,fork,reuseaddr EXEC:cat </dev/null >/dev/null 2>&1 &
  BG+=($!)
done
in_pod b setsid socat -u TCP-LISTEN:7001,fork,reuseaddr "OPEN:$T/received,creat,append" </dev/null >/dev/null 2>&1 &
BG+=($!)
sleep 0.5
# echo from-pod to-ip: a TCP round trip within 3 s
echo_ok() { [[ $(echo "ping-$1" | in_pod "$1" timeout 4 socat -t2 - "TCP:$2:7000,connect-timeout=3" 2>/dev/null) == "ping-$1" ]]; }
echo_fails() { ! echo_ok "$@"; }

# --- 1. authenticated, encrypted routes -----------------------------------------------------
all_encrypted() {
  local i j
  for i in 1 2 3; do for j in 1 2 3; do
    [[ $i == "$j" ]] && continue
    peer_is "$i" "$j" state established && peer_is "$i" "$j" encryption wireguard && peer_is "$i" "$j" path direct || return 1
  done; done
}
log "waiting for every node to authenticate and encrypt to every other"
check wait_until 90 all_encrypted
identity_published() { [[ $(kc get node "$(node 1)" -o json | jq -r '.metadata.annotations["weft.dev/mesh-identity"]') == $(mesh 1 | jq -r .identity) ]]; }
check identity_published
connections_metric() { (($(metric_value 1 'weft_mesh_connections{state="established"}') >= 2)); }
check connections_metric
for j in 2 3; do check route_dev 1 "$j" wgweft; done
check route_dev 3 1 wgweft
wg_device_up() { in_node 2 ip -j link show wgweft | jq -e '.[0].mtu == 1440 and (.[0].flags | index("UP"))' >/dev/null; }
check wg_device_up

# --- 2. traffic, and no plaintext on the underlay -------------------------------------------
check echo_ok a "$B"
check echo_ok a "$C"
check echo_ok c "$B"
MARKER="WEFT-MT9-PLAINTEXT-$RANDOM$RANDOM"
# tcpdump into $T/NAME.pcap; returns once it listens, its pid in CAP. A fresh log per capture
# (waiting for "listening on" in an old one would start the traffic before the capture);
# immediate mode (packets still in the kernel's ring when it is stopped would be lost); -Z
# root (tcpdump would otherwise write as its own user, which cannot write into $T).
capture() { # NAME NETNS DEV [FILTER]
  rm -f "$T/$1.log" "$T/$1.pcap"
  ip netns exec "$2" tcpdump -Z root -i "$3" --immediate-mode -U -n -w "$T/$1.pcap" ${4:+"$4"} >"$T/$1.log" 2>&1 &
  CAP=$!; BG+=("$CAP")
  wait_until 10 grep "listening on" "$T/$1.log"
}
captured() { tcpdump -n -r "$T/$1.pcap" ${2:+"$2"} 2>/dev/null | wc -l; } # NAME [FILTER]: packets
check capture underlay "$P-host" br-underlay
CAP1=$CAP
check capture inner "$(node 2)" wgweft
CAP2=$CAP
sleep 0.3
for n in 1 2 3 4 5; do echo "$MARKER line $n"; done | in_pod a timeout 5 socat -u - "TCP:$B:7001,connect-timeout=3"
sleep 0.5
# TERM, not INT: a background job of a non-interactive shell ignores SIGINT.
kill -TERM "$CAP1" "$CAP2"; wait "$CAP1" "$CAP2" 2>/dev/null
delivered() { grep -q "$MARKER line 5" "$T/received"; }
check delivered
inner_has_marker() { grep -aq "$MARKER" "$T/inner.pcap"; }
check inner_has_marker
underlay_has_no_marker() { [[ -s $T/underlay.pcap ]] && ! grep -aq "$MARKER" "$T/underlay.pcap"; }
check underlay_has_no_marker
underlay_carries_wireguard() { (($(captured underlay "udp port 51820") >= 4)); }
check underlay_carries_wireguard

# --- 3. the policy engine judges traffic arriving over wgweft --------------------------------
kc apply -f - >/dev/null <<'EOF'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-allowed, namespace: mt}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {role: allowed}}}], ports: [{port: 7000}]}]
EOF
log "policy: b accepts only role=allowed on 7000"
check wait_until 15 echo_fails c "$B"
check echo_ok a "$B"
policy_in_node2_ruleset() { in_node 2 nft -j list table inet weft | jq -e '[.nftables[] | .rule? | select(.) | .comment? // empty | select(startswith("mt/server-from-allowed"))] | length >= 1' >/dev/null; }
check policy_in_node2_ruleset
kc -n mt delete networkpolicy server-from-allowed >/dev/null
check wait_until 15 echo_ok c "$B"

# --- 4. a fake peer: malformed and oversized frames ------------------------------------------
violations() { metric_value 1 "weft_mesh_protocol_violations_total{violation=\"$1\"}"; }
fake_peer() { # what -> 0 when node1 closed the connection on it
  ip netns exec "$P-host" python3 - "$(node_ip 1)" "$1" <<'EOF'
import socket, struct, sys, time
host, what = sys.argv[1], sys.argv[2]
s = socket.create_connection((host, 6786), timeout=5)
if what == "malformed":
    body = b"\x07not-a-hello-at-all"
    s.sendall(struct.pack(">I", len(body)) + body)
else:  # oversized: a length prefix far over the 64 KiB limit, then bytes
    s.sendall(struct.pack(">I", 0x7FFFFFF0) + b"x" * 1024)
deadline = time.time() + 5
try:
    while time.time() < deadline:
        if s.recv(4096) == b"":
            sys.exit(0)          # closed by the node
except ConnectionResetError:
    sys.exit(0)
except socket.timeout:
    pass
sys.exit(1)
EOF
}
check fake_peer malformed
check fake_peer oversized
counted() { [[ $(violations "$1") -ge 1 ]]; }
check wait_until 5 counted malformed
check wait_until 5 counted oversize
check peer_is 1 2 state established
check echo_ok a "$B"

# Nothing blocked so far: no agent judged a WireGuard session silent (the tunnel probes raise
# no false alarm).
no_silence_yet() { ! grep -h "carries nothing" "$DIR"/logs/agent-node*.log; }
check no_silence_yet
# The echo prober at work (one request per peer per second), its replies counted.
echo_counted() { # node
  local sent replies
  sent=$(metric_value "$1" weft_mesh_echo_requests_total) replies=$(metric_value "$1" weft_mesh_echo_replies_total)
  [[ -n $(metric_value "$1" weft_mesh_echo_send_errors_total) ]] &&
    ((${sent:-0} >= 10 && ${replies:-0} >= 10 && ${replies:-0} <= sent))
}
check echo_counted 1
check echo_counted 3

# After node1 <-> node3 is unblocked: their path direct again both ways, pods through.
direct_again() {
  check wait_until 40 peer_is 1 3 path direct
  check wait_until 20 peer_is 3 1 path direct
  check wait_until 10 echo_ok a "$C"
}
# While it is blocked: their pods still reach each other (relayed), both ways.
reach_each_other() {
  check wait_until 15 echo_ok a "$C"
  check wait_until 15 echo_ok c "$A"
}

# --- 5. relay: node1 <-> node3 blocked on the underlay ---------------------------------------
block() { # [more match, e.g. "udp dport 51820"]: node1 drops node3's underlay traffic (that part)
  in_node 1 nft -f - <<EOF
table inet weft-mt9-block {
  chain in { type filter hook input priority -300; ip saddr $(node_ip 3) ${1:-} drop; }
  chain out { type filter hook output priority -300; ip daddr $(node_ip 3) ${1:-} drop; }
}
EOF
}
unblock() { in_node 1 nft delete table inet weft-mt9-block; }
log "blocking node1 <-> node3"
block
check wait_until 30 peer_is 1 3 path "via $(node 2)"
check wait_until 30 peer_is 3 1 path "via $(node 2)"
relayed_metric() { [[ $(metric_value 1 weft_mesh_relayed_peers) == 1 ]]; }
check relayed_metric
# Per peer only: the paths that do not involve the blocked pair stay direct.
check peer_is 1 2 path direct
check peer_is 2 1 path direct
check peer_is 2 3 path direct
check peer_is 3 2 path direct
# node1's WireGuard peer node2 now carries node3's podCIDR.
allowed_of() { # node-index: the AllowedIPs lines of that node's peer entry in node1's wgweft.conf
  local key; key=$(mesh "$1" | jq -r .encryption.public_key)
  awk -v k="$key" '/^\[Peer\]/{p=0} $0 == "PublicKey = " k {p=1} p && /^AllowedIPs/' "$DIR/run/node1/wg/wgweft.conf"
}
allowed_via_node2() { allowed_of 2 | grep -F "${C[3]}" >/dev/null; }
check allowed_via_node2
check wait_until 10 echo_ok a "$C"
check echo_ok c "$A"
log "unblocking"
unblock
direct_again

# --- 5b. WireGuard's UDP port blocked between node1 and node3, the control connection open ----
# node3's weft-wg restarted meanwhile (its device and sessions new): no WireGuard session can
# form with node1. Past the grace node3 reports it (metric, /debug/mesh, log naming the port),
# never sends node1's pods plaintext (the route stays on wgweft), and both ends relay through
# node2 (the path counts as down); unblocked: a session forms, direct again. The restart also
# shows the overlay putting node3's routes back on the new wgweft.
failing_is() { [[ $(metric_value "$1" weft_mesh_wireguard_failing_peers) == "$2" ]]; }
log "blocking WireGuard's UDP port between node1 and node3; node3's weft-wg restarted"
block "udp dport 51820"
kill "$(cat "$DIR/pids/weft-wg-node3.pid")"
wait_until 10 bash -c "! ip -n $(node 3) link show wgweft"
ip netns exec "$(node 3)" setsid "$TARGET/debug/weft-wg" run --config "$DIR/run/node3/wg/wgweft.conf" \
  >>"$DIR/logs/weft-wg-node3.log" 2>&1 </dev/null &
echo $! >"$DIR/pids/weft-wg-node3.pid"
check wait_until 20 route_dev 3 2 wgweft
check wait_until 20 echo_ok c "$B"
check wait_until 60 failing_is 3 1
wg_problem_shown() { [[ $(peer 3 1 wireguard_problem) == *"UDP port 51820"* ]]; }
check wg_problem_shown
wg_failure_logged() { grep -q "no WireGuard session with the peer" "$DIR/logs/agent-node3.log"; }
check wg_failure_logged
check wait_until 30 peer_is 3 1 path "via $(node 2)"
check wait_until 30 peer_is 1 3 path "via $(node 2)"
check route_dev 3 1 wgweft
check peer_is 3 2 path direct
reach_each_other
log "unblocking WireGuard's UDP port"
unblock
check wait_until 60 failing_is 3 0
direct_again

# --- 5c. WireGuard's UDP port blocked between node1 and node3, their session up ---------------
silent_is() { [[ $(metric_value "$1" weft_mesh_wireguard_silent_peers) == "$2" ]]; }
check wait_until 10 echo_ok a "$C"
check peer_is 1 3 path direct
check silent_is 1 0
log "blocking WireGuard's UDP port between node1 and node3 with their session up"
block "udp dport 51820"
blocked_at=$SECONDS
check wait_until 20 silent_is 1 1
check wait_until 20 silent_is 3 1
check wait_until 20 peer_is 1 3 path "via $(node 2)"
check wait_until 20 peer_is 3 1 path "via $(node 2)"
log "relayed $((SECONDS - blocked_at)) s after the block (WireGuard alone: 180 s or more)"
tunnel_problem_shown() { [[ $(peer 1 3 wireguard_problem) == *"no answer through the WireGuard session"*"UDP port 51820"* ]]; }
check tunnel_problem_shown
silence_logged() { grep "the WireGuard session with the peer carries nothing" "$DIR/logs/agent-node1.log" >/dev/null; }
check silence_logged
# node1's WireGuard configuration: node2 carries node3's podCIDR, node3 keeps its tunnel address.
node3_keeps_its_tunnel_address() { allowed_of 3 | grep -F "$(tunnel4 3)/32" >/dev/null; }
check allowed_via_node2
check node3_keeps_its_tunnel_address
check route_dev 1 3 wgweft
check peer_is 1 2 path direct
check peer_is 2 3 path direct
reach_each_other
log "unblocking WireGuard's UDP port"
unblock
check wait_until 30 silent_is 1 0
direct_again

# --- 6. mixed mode: node3 without encryption --------------------------------------------------
log "node3's agent restarted with --encryption off"
sed -i 's/--encryption on/--encryption off/' "$DIR/run/node3/agent.cmd"
bash "$LAB" restart-agent 3 TERM 0 >/dev/null 2>&1
check wait_until 40 peer_is 1 3 encryption plain
check wait_until 10 route_dev 1 3 vxweft
check route_gw 1 3 "$(tunnel4 3)"
check route_dev 1 2 wgweft
check peer_is 3 1 encryption plain
check wait_until 10 echo_ok a "$C"
check echo_ok c "$B"
log "blocking node1 <-> node3 (mixed mode)"
block
check wait_until 30 route_gw 3 1 "$(tunnel4 2)"
check wait_until 10 echo_ok c "$A"
unblock
check wait_until 40 route_gw 3 1 "$(tunnel4 1)"

# --- 6c. encryption required on node1 ----------------------------------------------------------
# node1's agent restarted with --encryption required: node3 (encryption off since 6) becomes
# unreachable from node1 instead of plain VXLAN, node2 stays encrypted. node1's weft-wg
# stopped: node2 becomes unreachable from node1 too, and the underlay carries no VXLAN from
# node1 (tcpdump on the lab's bridge); weft-wg started again: encrypted again. node1 back to
# --encryption on afterwards.
log "node1's agent restarted with --encryption required"
sed -i 's/--encryption on/--encryption required/' "$DIR/run/node1/agent.cmd"
bash "$LAB" restart-agent 1 TERM 0 >/dev/null 2>&1
required_shown() { [[ $(mesh 1 | jq -r .encryption.required) == true ]]; }
check wait_until 40 required_shown
check wait_until 40 route_type 1 3 unreachable
check wait_until 10 route_dev 1 2 wgweft
check wait_until 10 echo_ok a "$B"
check echo_fails a "$C"
required_logged() { grep "encryption is required and the peer cannot be reached over WireGuard" "$DIR/logs/agent-node1.log" >/dev/null; }
check required_logged
# node3 still sends plain VXLAN to node1 (its encryption is off): node1 drops it on input.
guard_rule() { # node -> the guard's rule as nft prints it in JSON (empty: no table)
  in_node "$1" nft -j list table inet weft-guard 2>/dev/null | jq -c '.nftables[] | select(.rule) | .rule'
}
guard_dropped() { # node min-packets
  guard_rule "$1" | jq -e --argjson n "$2" 'select(.expr | any(.match?.right == 4789)) | select(.expr | any(type == "object" and has("drop"))) | select(.expr | any(.counter?.packets >= $n))' >/dev/null
}
check wait_until 20 guard_dropped 1 0
check echo_fails c "$A"
check guard_dropped 1 1
no_guard_elsewhere() { [[ -z $(guard_rule 2) && -z $(guard_rule 3) ]]; }
check no_guard_elsewhere
log "node1's weft-wg stopped"
# VXLAN from node1 on the lab's bridge (stopped a second after the traffic).
check capture required "$P-host" br-underlay "udp port 4789 and src host $(node_ip 1)"
kill "$(cat "$DIR/pids/weft-wg-node1.pid")"
check wait_until 20 route_type 1 2 unreachable
check echo_fails a "$B"
check echo_fails a "$C"
sleep 1; kill -TERM "$CAP"; wait "$CAP" 2>/dev/null
no_vxlan_from_node1() { [[ -f $T/required.pcap ]] && (($(captured required) == 0)); }
check no_vxlan_from_node1
ip netns exec "$(node 1)" setsid "$TARGET/debug/weft-wg" run --config "$DIR/run/node1/wg/wgweft.conf" \
  >>"$DIR/logs/weft-wg-node1.log" 2>&1 </dev/null &
echo $! >"$DIR/pids/weft-wg-node1.pid"
check wait_until 30 route_dev 1 2 wgweft
check wait_until 15 echo_ok a "$B"
log "node1's agent back to --encryption on"
sed -i 's/--encryption required/--encryption on/' "$DIR/run/node1/agent.cmd"
bash "$LAB" restart-agent 1 TERM 0 >/dev/null 2>&1
check wait_until 40 route_dev 1 3 vxweft
no_guard_on_node1() { [[ -z $(guard_rule 1) ]]; }
check wait_until 20 no_guard_on_node1
# The control for no_vxlan_from_node1: the same capture sees node1's VXLAN to node3 now.
check capture control "$P-host" br-underlay "udp port 4789 and src host $(node_ip 1)"
check wait_until 10 echo_ok a "$C"
sleep 1; kill -TERM "$CAP"; wait "$CAP" 2>/dev/null
vxlan_from_node1_seen() { (($(captured control) >= 2)) || { cat "$T/control.log"; return 1; }; }
check vxlan_from_node1_seen

# --- 7. a wrong cluster secret ----------------------------------------------------------------
log "the Secret replaced in the API, only node3's agent restarted: node3 has a wrong secret"
# The value goes through files and stdin only (no argv).
set_secret() { kc -n kube-system get secret weft-mesh -o json | jq --rawfile s "$1" '.data.secret = ($s | @base64)' | kc replace -f - >/dev/null; }
head -c 32 /dev/urandom | base64 >"$T/secret-wrong"
set_secret "$T/secret-wrong"
bash "$LAB" restart-agent 3 TERM 0 >/dev/null 2>&1
check wait_until 20 mounted_secret_is 3 "$T/secret-wrong"
check mounted_secret_is 1 "$T/secret-api"
check wait_until 40 peer_is 1 3 state refused
check wait_until 20 peer_is 2 3 state refused
refused_metric() { [[ $(metric_value 1 weft_mesh_refused_peers) == 1 ]]; }
check refused_metric
terminations_metric() { metrics 1 | awk '$1 ~ /^weft_mesh_connection_terminations_total\{reason="/ {n += $2} END {exit !(n >= 1)}'; }
check terminations_metric
secret_failures() { metrics 1 | awk '$1 ~ /^weft_mesh_handshake_failures_total\{reason="(cluster_secret_mismatch|refused_cluster_secret)"\}$/ {n += $2} END {exit !(n >= 1)}'; }
check secret_failures
logged() { grep -q "cluster secret mismatch" "$DIR/logs/agent-node1.log"; }
check logged
check wait_until 10 route_type 1 3 unreachable
check echo_fails a "$C"
check echo_ok a "$B"
# The rotation undone in the API (node3 keeps its wrong secret until its next start).
set_secret "$T/secret-api"
secret_restored() { api_secret | cmp -s - "$T/secret-api"; }
check secret_restored

# --- 8. the kernel WireGuard path, where the module exists -------------------------------------
if [[ -d /sys/module/wireguard ]] && command -v wg >/dev/null; then
  log "kernel WireGuard: node1's agent restarted with --wireguard kernel (weft-wg stopped)"
  kill "$(cat "$DIR/pids/weft-wg-node1.pid")" 2>/dev/null
  wait_until 10 bash -c "! ip -n $(node 1) link show wgweft"
  sed -i 's/--wireguard userspace/--wireguard kernel/' "$DIR/run/node1/agent.cmd"
  bash "$LAB" restart-agent 1 TERM 0 >/dev/null 2>&1
  kernel_link() { in_node 1 ip -j -d link show wgweft | jq -e '.[0].linkinfo.info_kind == "wireguard"' >/dev/null; }
  check wait_until 30 kernel_link
  check wait_until 40 peer_is 1 2 encryption wireguard
  check wait_until 10 echo_ok a "$B"
else
  echo "skip kernel WireGuard path: no wireguard module (/sys/module/wireguard) or no wg tool on this machine"
fi

finish
