#!/usr/bin/env bash
# The lab's demo: two namespaces, five pods over the nodes, three policies (a named port, a
# namespace selector, an ipBlock with an exception, a default-deny egress), and the truth table.
#
#   demo.sh up DIR      create namespaces, pods (API + netns + weft-cni + status + servers),
#                       Services, policies
#   demo.sh table DIR   probe every pair through the pod IP and the Service ClusterIP
#   demo.sh down DIR    stop servers, CNI DEL every pod, delete pod namespaces
#
# This script plays the kubelet's part; everything it talks to is real.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
K8S="$REPO/conformance/k8s"
DIR=${2:?DIR}
PREFIX=${WEFT_LAB_PREFIX:-weft-lab}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
WEFT_CNI="$TARGET/debug/weft-cni"

log() { printf '[demo %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
kc() { bash "$K8S/cluster.sh" kubectl "$DIR/cluster" "$@"; }

# ns/name  node-index  labels(k=v,...)  ports(name:port,...)
PODS=(
  "shop/api 1 app=api http:8080"
  "shop/db 1 app=db pg:5432"
  "clients/ui 2 app=ui http:8080"
  "clients/batch 2 app=batch -"
  "shop/admin 3 app=admin -"
)

pod_ns() { echo "$PREFIX-pod-${1%/*}-${1#*/}"; }

cni() { # command pod-key node-index
  local cmd=$1 key=$2 i=$3 ns=${2%/*} name=${2#*/} uid
  uid=$(cat "$DIR/pods/${ns}_${name}.uid" 2>/dev/null || echo "")
  CNI_COMMAND=$cmd CNI_CONTAINERID="lab-${ns}-${name}" CNI_NETNS="/run/netns/$(pod_ns "$key")" \
    CNI_IFNAME=eth0 CNI_PATH="$TARGET/debug" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$ns;K8S_POD_NAME=$name;K8S_POD_UID=$uid" \
    ip netns exec "$PREFIX-node$i" "$WEFT_CNI" <<EOF
{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","agentSocket":"$DIR/run/node$i/agent.sock","stateDir":"$DIR/run/node$i"}
EOF
}

cmd_up() {
  local nodes; nodes=$(cat "$DIR/nodes")
  mkdir -p "$DIR/pods"
  kc apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: payments}}
---
apiVersion: v1
kind: Namespace
metadata: {name: clients, labels: {team: web}}
EOF
  wait_sa() { kc -n "$1" get serviceaccount default; }
  for ns in shop clients; do
    local deadline=$((SECONDS + 30))
    until wait_sa "$ns" >/dev/null 2>&1; do ((SECONDS < deadline)) || die "no default ServiceAccount in $ns"; sleep 0.5; done
  done
  for spec in "${PODS[@]}"; do
    read -r key i labels ports <<<"$spec"
    ((i > nodes)) && i=$nodes
    local ns=${key%/*} name=${key#*/} node="$PREFIX-node$i"
    local lab_yaml="pod: $name" port_yaml="" k v
    IFS=, read -ra ls <<<"$labels"
    for l in "${ls[@]}"; do k=${l%%=*}; v=${l#*=}; lab_yaml+=", $k: $v"; done
    if [[ $ports != - ]]; then
      IFS=, read -ra ps <<<"$ports"
      for p in "${ps[@]}"; do port_yaml+="{name: ${p%%:*}, containerPort: ${p#*:}, protocol: TCP},"; done
    fi
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {namespace: $ns, name: $name, labels: {$lab_yaml}}
spec:
  nodeName: $node
  containers: [{name: main, image: lab/none, ports: [${port_yaml%,}]}]
EOF
    kc -n "$ns" get pod "$name" -o jsonpath='{.metadata.uid}' >"$DIR/pods/${ns}_${name}.uid"
    echo "$i" >"$DIR/pods/${ns}_${name}.node"
    ip netns add "$(pod_ns "$key")"
    ip -n "$(pod_ns "$key")" link set lo up
    local result
    result=$(cni ADD "$key" "$i") || die "CNI ADD of $key failed: $result"
    echo "$result" >"$DIR/pods/${ns}_${name}.cni.json"
    local ips
    ips=$(jq -r '[.ips[].address | split("/")[0]] | join(" ")' <<<"$result")
    local ip4 ip6 podips=""
    for a in $ips; do
      if [[ $a == *:* ]]; then ip6=$a; else ip4=$a; fi
      podips+="{\"ip\":\"$a\"},"
    done
    echo "${ip4:-} ${ip6:-}" >"$DIR/pods/${ns}_${name}.ips"
    kc -n "$ns" patch pod "$name" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"${ip4:-$ip6}\",\"podIPs\":[${podips%,}],\"hostIP\":\"198.18.0.$((10 + i))\",\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"},{\"type\":\"ContainersReady\",\"status\":\"True\"}]}}" >/dev/null
    # Servers on the declared ports (and 8080 on every pod, so the table has targets).
    local sport
    for sport in 8080 5432; do
      ip netns exec "$(pod_ns "$key")" setsid socat "TCP6-LISTEN:$sport,fork,reuseaddr,ipv6only=0" EXEC:/bin/true \
        >/dev/null 2>&1 </dev/null &
      echo $! >>"$DIR/pods/${ns}_${name}.servers"
    done
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {namespace: $ns, name: s-$name}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {pod: $name}
  ports: [{name: p8080, port: 8080, protocol: TCP}, {name: p5432, port: 5432, protocol: TCP}]
EOF
    log "pod $key on node$i: ${ip4:-} ${ip6:-}"
  done
  local batch_ip node2cidr
  batch_ip=$(awk '{print $1}' "$DIR/pods/clients_batch.ips")
  node2cidr=$(kc get node "$PREFIX-node$((nodes >= 2 ? 2 : 1))" -o jsonpath='{.spec.podCIDRs[0]}')
  kc apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: api-from-ui}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: web}}, podSelector: {matchLabels: {app: ui}}}]
    ports: [{port: http}]
  - from: [{ipBlock: {cidr: $node2cidr, except: [$batch_ip/32]}}]
    ports: [{port: 8080, endPort: 8089}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db-from-api}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: pg}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: clients, name: batch-egress-only-api}
spec:
  podSelector: {matchLabels: {app: batch}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}]
EOF
  log "policies: shop/api-from-ui (named port from team=web ui; node2's pods but batch on 8080-8089), shop/db-from-api (named port pg from api; no egress), clients/batch-egress-only-api"
  # Let the agents catch up before the first probe: every agent reports the policies applied.
  local rv
  rv=$(kc -n clients get networkpolicy batch-egress-only-api -o jsonpath='{.metadata.resourceVersion}')
  for ((i = 1; i <= nodes; i++)); do
    local deadline=$((SECONDS + 30))
    until [[ $(ip netns exec "$PREFIX-node$i" curl -s --unix-socket "$DIR/run/node$i/agent.sock" http://x/debug/state \
      | jq -r '.kinds.networkpolicies.applied_resource_version // "0"') -ge $rv ]]; do
      ((SECONDS < deadline)) || die "node$i did not apply the policies"
      sleep 0.2
    done
  done
}

probe() { # from-key ip port -> 0 if a TCP connection is established within 1 s
  ip netns exec "$(pod_ns "$1")" socat -T1 /dev/null "TCP:$2:$3,connect-timeout=1" >/dev/null 2>&1
}

cmd_table() {
  local keys=() k tmp
  for spec in "${PODS[@]}"; do keys+=("${spec%% *}"); done
  tmp=$(mktemp -d)
  for via in pod service; do
    for port in 8080 5432; do
      # Every cell of one table is probed at once (a blocked probe waits out its 1 s timeout).
      for ((i = 0; i < ${#keys[@]}; i++)); do
        for ((j = 0; j < ${#keys[@]}; j++)); do
          ((i == j)) && continue
          local to=${keys[$j]} dst
          if [[ $via == pod ]]; then
            dst=$(awk '{print $1}' "$DIR/pods/${to%/*}_${to#*/}.ips")
          else
            dst=$(kc -n "${to%/*}" get svc "s-${to#*/}" -o jsonpath='{.spec.clusterIP}')
          fi
          ( if probe "${keys[$i]}" "$dst" "$port"; then echo .; else echo X; fi >"$tmp/$i-$j" ) &
        done
      done
      wait
      printf '\nTCP %s via %s IP ('"'"'.'"'"' connects, X blocked; rows are clients, columns servers):\n' "$port" "$via"
      printf '%-14s' ""
      for ((j = 0; j < ${#keys[@]}; j++)); do printf ' %d' "$j"; done
      echo
      for ((i = 0; i < ${#keys[@]}; i++)); do
        printf '%-14s' "${keys[$i]}"
        for ((j = 0; j < ${#keys[@]}; j++)); do
          if ((i == j)); then printf ' -'; else printf ' %s' "$(cat "$tmp/$i-$j")"; fi
        done
        printf '   %d\n' "$i"
      done
    done
  done
  rm -rf "$tmp"
}

cmd_down() {
  [[ -d "$DIR/pods" ]] || return 0
  for f in "$DIR"/pods/*.servers; do
    [[ -f "$f" ]] || continue
    xargs -r kill -KILL <"$f" 2>/dev/null || true
  done
  for spec in "${PODS[@]}"; do
    read -r key i _ <<<"$spec"
    local f="$DIR/pods/${key%/*}_${key#*/}.node"
    [[ -f "$f" ]] && cni DEL "$key" "$(cat "$f")" >/dev/null 2>&1 || true
    ip netns del "$(pod_ns "$key")" 2>/dev/null || true
  done
}

case "${1:-}" in
  up) cmd_up ;;
  table) cmd_table ;;
  down) cmd_down ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
