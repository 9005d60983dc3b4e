#!/usr/bin/env bash
# weft lab: a local multi-node cluster in network namespaces, for a person to play with.
#
#   lab.sh up [NODES]   start (default 3 nodes), create the demo, print the truth table
#   lab.sh table        probe the demo again and print the truth table
#   lab.sh down         remove every process, namespace and file of the lab
#   lab.sh status       what runs
#   lab.sh restart-agent I|all [SIGNAL] [DELAY]
#                       stop node I's agent (or every node's) with SIGNAL (default TERM; KILL =
#                       crash), wait DELAY seconds (default 1), start it again with the argv it
#                       was started with ($DIR/run/node<i>/agent.cmd; start time in agent.started);
#                       does not wait for ready
#
# Real components only: etcd, kube-apiserver, kube-controller-manager (conformance/k8s), one
# `weft agent` and one `kube-proxy` (nftables mode) per node namespace; every pod is a network
# namespace attached by the real `weft-cni` binary. The lab plays the kubelet: it creates pods in
# the API, attaches them, writes their status and runs their servers. Each agent runs as the
# DaemonSet in manifests/ says (its command, args, env, ConfigMap, capability set, volumes and
# ServiceAccount: conformance/lab/manifest-agent.sh); the lab adds only WEFT_AGENT_ARGS.
#
# Env: WEFT_LAB_DIR (default /tmp/weft-lab), CARGO_TARGET_DIR (where weft is built),
#      WEFT_LAB_DEMO=0 (up without the demo: an empty cluster, e.g. for conformance/lab/bench.sh),
#      WEFT_AGENT_ARGS (extra `weft agent` flags for every node; a flag the manifest sets is
#      overridden), WEFT_LAB_API (HOST:PORT the agents use as KUBERNETES_SERVICE_HOST/PORT,
#      default the apiserver's 198.18.0.1:6443; e.g. a fault-injecting proxy),
#      WEFT_LAB_PREFIX (namespace prefix, default weft-lab: set it to run two labs at once),
#      WEFT_LAB_PROFILE=release (build and run optimised binaries; default debug),
#      WEFT_LAB_ENCRYPTION=1, WEFT_LAB_SECRET_FILE (the mesh with encryption: lab_encryption_node).
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
K8S="$REPO/conformance/k8s"
DIR=${WEFT_LAB_DIR:-/tmp/weft-lab}
PREFIX=${WEFT_LAB_PREFIX:-weft-lab}
[[ "$PREFIX" =~ ^[a-z0-9][a-z0-9-]{0,12}$ ]] || { echo "WEFT_LAB_PREFIX must match [a-z0-9][a-z0-9-]{0,12}" >&2; exit 2; }
export WEFT_NS_PREFIX=$PREFIX WEFT_LAB_PREFIX=$PREFIX
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
PROFILE=${WEFT_LAB_PROFILE:-debug}
WEFT="$TARGET/$PROFILE/weft"
WEFT_CNI="$TARGET/$PROFILE/weft-cni"

log() { printf '[lab %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

kc() { bash "$K8S/cluster.sh" kubectl "$DIR/cluster" "$@"; }

# Waits until "$@" succeeds: description, seconds, command...
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}

node_ns() { echo "$PREFIX-node$1"; }
node_name() { echo "$PREFIX-node$1"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }

start_bg() { # name netns cmd...   (log in $DIR/logs/name.log, pid in $DIR/pids/name.pid)
  local name=$1 ns=$2; shift 2
  mkdir -p "$DIR/logs" "$DIR/pids"
  ip netns exec "$ns" setsid "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}

start_agent() { # node-index argv...   (the argv is recorded for restart-agent)
  local i=$1; shift
  printf '%q ' "$@" >"$DIR/run/node$i/agent.cmd"
  start_bg "agent-node$i" "$(node_ns "$i")" "$@"
}

# --- opt-in: the node mesh and encryption (issue 9) ---------------------------------------
# WEFT_LAB_ENCRYPTION=1: every agent runs the mesh with encryption on. The cluster secret goes
# the DaemonSet's way: the lab creates the Secret kube-system/weft-mesh (key `secret`) in the
# API and manifest-agent.sh mounts it, as a kubelet would, where the manifest's
# --mesh-secret-file looks (no secret in any argv or environment). Its content is
# WEFT_LAB_SECRET_FILE's (default: 32 random bytes); the lab keeps a copy in $DIR/mesh-secret
# (0600) for tests. `--encryption on --wireguard userspace` go through WEFT_AGENT_ARGS, and one
# weft-wg per node namespace owns its wgweft (config $DIR/run/node<i>/wg/wgweft.conf, written
# by the agent; log in $DIR/logs/weft-wg-node<i>.log). Called once per node, before the node's
# agent starts; the first call also builds weft-wg. (The agent publishes its mesh identity as
# an annotation on its own Node: manifests/rbac.yaml lets it patch Nodes.)
lab_encryption_node() { # node-index
  local i=$1 secret=$DIR/mesh-secret
  if [[ ! -s $secret ]]; then
    log "encryption: building weft-wg; the Secret kube-system/weft-mesh (a copy in $secret)"
    (cd "$REPO" && cargo build -q "${release[@]}" -p weft-mesh --bin weft-wg)
    (
      umask 077
      if [[ -n ${WEFT_LAB_SECRET_FILE:-} ]]; then
        cp "$WEFT_LAB_SECRET_FILE" "$secret"
      else
        head -c 32 /dev/urandom | base64 >"$secret"
      fi
    )
    chmod 600 "$secret"
    kc -n kube-system create secret generic weft-mesh --from-file=secret="$secret" >/dev/null
    WEFT_AGENT_ARGS="${WEFT_AGENT_ARGS:-} --encryption on --wireguard userspace"
  fi
  mkdir -p "$DIR/run/node$i/wg"
  start_bg "weft-wg-node$i" "$(node_ns "$i")" "$TARGET/$PROFILE/weft-wg" run --config "$DIR/run/node$i/wg/wgweft.conf"
}

cmd_up() {
  local nodes=${1:-3}
  [[ -e "$DIR/cluster/state/env" ]] && die "a lab already runs in $DIR: '$0 down' first"
  mkdir -p "$DIR"
  trap 'log "failed: tearing down"; cmd_down; exit 1' ERR INT TERM
  log "building weft and weft-cni"
  local release=()
  [[ $PROFILE == release ]] && release=(--release)
  (cd "$REPO" && cargo build -q "${release[@]}" -p weft -p weft-cni)
  log "Kubernetes components (built once, cached)"
  bash "$K8S/install.sh" >&2
  log "control plane + $nodes node namespaces"
  WEFT_NODES=$nodes bash "$K8S/cluster.sh" up "$DIR/cluster" >&2
  local bin
  bin=$(bash "$K8S/install.sh" --print)
  # The manifests as the API server has them: RBAC, ConfigMap, the DaemonSet's pod spec, a token.
  bash "$HERE/manifest-agent.sh" prepare "$DIR" bash "$K8S/cluster.sh" kubectl "$DIR/cluster"
  for ((i = 1; i <= nodes; i++)); do
    local n ns ip
    n=$(node_name "$i"); ns=$(node_ns "$i"); ip=$(node_ip "$i")
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $n
  labels: {kubernetes.io/hostname: $n, kubernetes.io/os: linux}
EOF
    kc patch node "$n" --subresource=status --type=merge \
      -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$ip\"},{\"type\":\"Hostname\",\"address\":\"$n\"}]}}" >/dev/null
    wait_for "podCIDRs of $n" 60 bash -c "[[ -n \"\$(bash '$K8S/cluster.sh' kubectl '$DIR/cluster' get node $n -o jsonpath='{.spec.podCIDRs}')\" ]]"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    [[ ${WEFT_LAB_ENCRYPTION:-0} == 1 ]] && lab_encryption_node "$i"
    mkdir -p "$DIR/run/node$i"
    # shellcheck disable=SC2086 # WEFT_AGENT_ARGS is a list of flags
    start_agent "$i" env WEFT_IMAGE_BIN="$TARGET/$PROFILE" bash "$HERE/manifest-agent.sh" run \
      "$DIR" "$n" "$DIR/run/node$i" "${WEFT_LAB_API:-198.18.0.1:6443}" ${WEFT_AGENT_ARGS:-}
    start_bg "kube-proxy-node$i" "$ns" "$bin/kube-proxy" \
      --kubeconfig "$DIR/cluster/kubeconfig/kube-proxy.kubeconfig" \
      --proxy-mode nftables --hostname-override "$n" \
      --cluster-cidr 10.244.0.0/16,fd00:10:244::/48 \
      --conntrack-max-per-core 0 --conntrack-min 0 \
      --metrics-bind-address "$ip:10249" --healthz-bind-address "$ip:10256"
  done
  for ((i = 1; i <= nodes; i++)); do
    wait_for "weft agent on node$i to be ready" 90 ip netns exec "$(node_ns "$i")" curl -sf "http://$(node_ip "$i"):6784/readyz"
    # The agent writes the node's conflist once it is ready (adopted, CNI served).
    wait_for "the conflist of node$i" 30 test -s "$DIR/run/node$i/net.d/10-weft.conflist"
  done
  echo "$nodes" >"$DIR/nodes"
  log "cluster up: $nodes nodes, agents ready"
  trap - ERR INT TERM
  [[ "${WEFT_LAB_DEMO:-1}" == 0 ]] && return 0
  bash "$HERE/demo.sh" up "$DIR"
  cmd_table
  cat <<EOF

Look around:
  kubectl:        bash $K8S/cluster.sh kubectl $DIR/cluster get pods -A -o wide
  the ruleset:    ip netns exec $(node_ns 1) nft list table inet weft
  agent metrics:  ip netns exec $(node_ns 1) curl -s http://$(node_ip 1):6784/metrics
  a pod's shell:  ip netns exec $PREFIX-pod-shop-api bash
  probe again:    $0 table
  remove it all:  $0 down
EOF
}

cmd_table() {
  bash "$HERE/demo.sh" table "$DIR"
}

cmd_down() {
  trap - ERR INT TERM
  bash "$HERE/demo.sh" down "$DIR" 2>/dev/null || true
  if [[ -d "$DIR/pids" ]]; then
    for f in "$DIR"/pids/*.pid; do
      [[ -f "$f" ]] || continue
      local pid; pid=$(cat "$f")
      kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    for f in "$DIR"/pids/*.pid; do
      [[ -f "$f" ]] || continue
      local pid; pid=$(cat "$f")
      kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      rm -f "$f"
    done
  fi
  [[ -d "$DIR/cluster" ]] && bash "$K8S/cluster.sh" down "$DIR/cluster" >&2 || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$PREFIX-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$DIR"
  log "lab removed"
}

cmd_restart_agent() { # I|all [SIGNAL] [DELAY]
  local which=${1:?node index or all} sig=${2:-TERM} delay=${3:-1} nodes i pid
  nodes=$(cat "$DIR/nodes" 2>/dev/null) || die "no lab in $DIR"
  local list=()
  if [[ $which == all ]]; then for ((i = 1; i <= nodes; i++)); do list+=("$i"); done; else list=("$which"); fi
  for i in "${list[@]}"; do
    [[ -s "$DIR/run/node$i/agent.cmd" ]] || die "no recorded argv for node$i's agent"
    pid=$(cat "$DIR/pids/agent-node$i.pid")
    kill "-$sig" "$pid" 2>/dev/null || log "node$i's agent ($pid) was not running"
  done
  for i in "${list[@]}"; do
    pid=$(cat "$DIR/pids/agent-node$i.pid")
    wait_for "node$i's agent ($pid) to exit" 30 bash -c "! kill -0 $pid"
  done
  sleep "$delay"
  for i in "${list[@]}"; do
    local argv
    eval "argv=($(cat "$DIR/run/node$i/agent.cmd"))"
    echo "--- restart-agent $(date +%T.%N) after SIG$sig" >>"$DIR/logs/agent-node$i.log"
    date +%s.%N >"$DIR/run/node$i/agent.started"
    start_bg "agent-node$i" "$(node_ns "$i")" "${argv[@]}"
    log "node$i's agent restarted (pid $(cat "$DIR/pids/agent-node$i.pid"))"
  done
}

cmd_status() {
  [[ -d "$DIR/cluster" ]] || { echo "no lab in $DIR"; return 0; }
  bash "$K8S/cluster.sh" status "$DIR/cluster" || true
  for f in "$DIR"/pids/*.pid; do
    [[ -f "$f" ]] || continue
    local name; name=$(basename "$f" .pid)
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$name: running"; else echo "$name: DEAD (see $DIR/logs/$name.log)"; fi
  done
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  table) cmd_table ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart-agent) shift; cmd_restart_agent "$@" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
