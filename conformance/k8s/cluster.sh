#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
# inside network namespaces, for tests. See README.md.
#
#   cluster.sh up DIR            start; DIR gets pki/, kubeconfig/, logs/, pids/, etcd/
#   cluster.sh down DIR          stop everything `up DIR` started, delete its namespaces
#   cluster.sh status DIR        which processes are alive + apiserver /readyz
#   cluster.sh kubectl DIR ARGS  kubectl as admin, run inside the host namespace
#   cluster.sh restart DIR NAME [SIG]  stop NAME (etcd|kube-apiserver|kube-controller-manager)
#                                with SIG (default TERM; KILL = crash), start it again with
#                                the same arguments, wait until it is ready
#
# Env (read by `up`; `down`/`status` use what `up` recorded in DIR):
#   WEFT_NS_PREFIX             namespace prefix (default weft): ${prefix}-host, ${prefix}-node<i>
#   WEFT_NODES                 number of node namespaces (default 0)
#   WEFT_BIN_DIR               where the binaries are (default: install.sh --print)
#   WEFT_APISERVER_EXTRA_ARGS  appended to kube-apiserver's arguments (word-split)
#   WEFT_KCM_EXTRA_ARGS        appended to kube-controller-manager's arguments (word-split)
#   WEFT_READY_TIMEOUT         seconds to wait for each readiness step (default 120)
#   WEFT_ETCD_FSYNC=1          keep etcd's fsync (default: --unsafe-no-fsync, it is a test cluster)
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

HOST_IP=198.18.0.1
UNDERLAY_PREFIX_LEN=24
APISERVER_URL="https://$HOST_IP:6443"
SERVICE_CIDRS=10.96.0.0/16,fd00:10:96::/112
CLUSTER_CIDRS=10.244.0.0/16,fd00:10:244::/48
KCM_CONTROLLERS=node-ipam-controller,endpointslice-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller,root-ca-certificate-publisher-controller

log() { printf '[cluster.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# --- state recorded in DIR ------------------------------------------------------
# DIR/state/netns     one namespace name a line, written BEFORE the namespace is created
# DIR/state/env       HOST_NS, BIN_DIR, NODES (sourced by down/status/kubectl)
# DIR/pids/<name>.pid one per process started

record_ns() { echo "$1" >>"$DIR/state/netns"; }

load_state() {
  [[ -f "$DIR/state/env" ]] || die "$DIR/state/env missing: was '$0 up $DIR' run?"
  # shellcheck disable=SC1091
  source "$DIR/state/env"
}

pid_alive() { # pidfile -> 0 if the recorded process is alive and is still the one we started
  local f=$1 pid start
  [[ -f "$f" ]] || return 1
  read -r pid start <"$f" || return 1
  [[ -n "$pid" && -d /proc/$pid ]] || return 1
  # field 22 of /proc/pid/stat = start time; guards against pid reuse
  [[ -z "$start" || "$(proc_start "$pid")" == "$start" ]]
}
proc_start() { awk '{sub(/^.*\) /, ""); print $20}' "/proc/$1/stat" 2>/dev/null; }

# --- certificates ---------------------------------------------------------------
PKI=
gen_ca() { # name CN
  openssl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 \
    -subj "/CN=$2" -keyout "$PKI/$1.key" -out "$PKI/$1.crt" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}
CA=ca
gen_cert() { # name subject extfile-lines...   (signed by $CA)
  local name=$1 subj=$2; shift 2
  printf '%s\n' "$@" >"$PKI/$name.ext"
  openssl req -new -nodes -newkey rsa:2048 -subj "$subj" \
    -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/$name.csr" \
    -CA "$PKI/$CA.crt" -CAkey "$PKI/$CA.key" -CAcreateserial \
    -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr"
}
client_cert() { # name CN [O]
  local subj="/CN=$2"
  [[ -n "${3:-}" ]] && subj="/O=$3$subj"
  gen_cert "$1" "$subj" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth"
}
kubeconfig() { # file user-cert-name server
  local out=$1 name=$2 server=$3
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weft
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$name.crt")
    client-key-data: $(base64 -w0 <"$PKI/$name.key")
contexts:
- name: weft
  context:
    cluster: weft
    user: $name
current-context: weft
EOF
  chmod 600 "$out"
}

make_pki() {
  PKI=$DIR/pki
  mkdir -p "$PKI" "$DIR/kubeconfig"
  chmod 700 "$PKI"
  gen_ca ca weft-test-ca
  gen_cert apiserver "/CN=kube-apiserver" \
    "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:$HOST_IP,IP:10.96.0.1,IP:fd00:10:96::1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # front proxy (aggregation layer): without it the controller-manager logs a
  # missing requestheader CA every few seconds
  gen_ca front-proxy-ca weft-test-front-proxy-ca
  CA=front-proxy-ca client_cert front-proxy-client front-proxy-client
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  client_cert admin admin system:masters
  client_cert controller-manager system:kube-controller-manager
  client_cert kube-proxy system:kube-proxy
  kubeconfig "$DIR/kubeconfig/admin.kubeconfig" admin "$APISERVER_URL"
  kubeconfig "$DIR/kubeconfig/admin-local.kubeconfig" admin "https://127.0.0.1:6443"
  kubeconfig "$DIR/kubeconfig/controller-manager.kubeconfig" controller-manager "$APISERVER_URL"
  kubeconfig "$DIR/kubeconfig/kube-proxy.kubeconfig" kube-proxy "$APISERVER_URL"
  local i
  for ((i = 1; i <= NODES; i++)); do
    client_cert "node$i" "system:weft-agent:node$i" "weft:agents"
    kubeconfig "$DIR/kubeconfig/node$i.kubeconfig" "node$i" "$APISERVER_URL"
  done
}

# --- processes ------------------------------------------------------------------
start_in_ns() { # name ns cmd...   (logs in DIR/logs/name.log, pid in DIR/pids/name.pid)
  local name=$1 ns=$2 pid; shift 2
  # the command line, NUL-separated, for `restart`
  printf '%s\0' "$ns" "$@" >"$DIR/state/$name.argv"
  # `ip netns exec` and `setsid` (not a group leader here) both exec: $! is the daemon.
  # A restart appends to the log of the previous run.
  if [[ "${LOG_APPEND:-0}" == 1 ]]; then
    setsid ip netns exec "$ns" "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 3>&- &
  else
    setsid ip netns exec "$ns" "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 3>&- &
  fi
  pid=$!
  sleep 0.2
  echo "$pid $(proc_start "$pid")" >"$DIR/pids/$name.pid"
  log "started $name (pid $pid) in netns $ns; log $DIR/logs/$name.log"
}

wait_for() { # description timeout-seconds pidfile-that-must-stay-alive cmd...
  local what=$1 timeout=$2 pidf=$3 deadline; shift 3
  deadline=$((SECONDS + timeout))
  while ! "$@" >/dev/null 2>&1; do
    if [[ -n "$pidf" ]] && ! pid_alive "$pidf"; then
      tail -n 30 "$DIR/logs/$(basename "$pidf" .pid).log" >&2 || true
      die "$(basename "$pidf" .pid) exited while waiting for $what"
    fi
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 1
  done
  log "ready: $what"
}

in_host() { ip netns exec "$HOST_NS" "$@"; }
admin_kubectl() { in_host "$BIN_DIR/kubectl" --kubeconfig "$DIR/kubeconfig/admin.kubeconfig" --request-timeout=20s "$@"; }
curl_api() { # path  (as admin, inside the host namespace)
  in_host curl -sS --max-time 5 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
    --key "$DIR/pki/admin.key" "https://127.0.0.1:6443$1"
}
readyz_ok() { [[ "$(curl_api /readyz)" == ok ]]; }
kcm_ok() { [[ "$(in_host curl -sk --max-time 5 https://127.0.0.1:10257/healthz)" == ok ]]; }

# --- network --------------------------------------------------------------------
# Membership tests read `ip netns list` with `grep -x ... >/dev/null`, not `grep -q`: under
# pipefail, `grep -q` exiting at its match kills the writers with SIGPIPE once the list is
# longer than one pipe write (a few hundred namespaces), and the test reads as "absent".
setup_netns() {
  local ns i node
  ns=$HOST_NS
  if ip netns list | awk '{print $1}' | grep -x "$ns" >/dev/null; then
    die "network namespace $ns already exists (not created by this run); run '$0 down' on the DIR that made it, or set WEFT_NS_PREFIX"
  fi
  record_ns "$ns"
  ip netns add "$ns"
  in_host ip link set lo up
  in_host ip link add br-underlay type bridge
  in_host ip addr add "$HOST_IP/$UNDERLAY_PREFIX_LEN" dev br-underlay
  in_host ip link set br-underlay up
  for ((i = 1; i <= NODES; i++)); do
    node="$PREFIX-node$i"
    if ip netns list | awk '{print $1}' | grep -x "$node" >/dev/null; then
      die "network namespace $node already exists (not created by this run)"
    fi
    record_ns "$node"
    ip netns add "$node"
    ip -n "$node" link set lo up
    # host side: vnode<i> enslaved to br-underlay; node side: eth0
    ip -n "$HOST_NS" link add "vnode$i" type veth peer name eth0 netns "$node"
    ip -n "$HOST_NS" link set "vnode$i" master br-underlay up
    ip -n "$node" addr add "198.18.0.$((10 + i))/$UNDERLAY_PREFIX_LEN" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" route add default via "$HOST_IP"
  done
  log "netns $HOST_NS ($HOST_IP on br-underlay) + $NODES node namespace(s)"
}

# --- RBAC -----------------------------------------------------------------------
write_rbac() {
  cat >"$DIR/rbac.yaml" <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: weft-agent
rules:
- apiGroups: [""]
  resources: [pods, namespaces, nodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: weft-agent
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: weft-agent
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: Group
  name: weft:agents
EOF
}

# --- commands -------------------------------------------------------------------
cmd_up() {
  PREFIX=${WEFT_NS_PREFIX:-weft}
  NODES=${WEFT_NODES:-0}
  [[ "$NODES" =~ ^[0-9]+$ ]] && ((NODES <= 200)) || die "WEFT_NODES must be 0..200 (got $NODES)"
  [[ "$PREFIX" =~ ^[a-z0-9][a-z0-9-]{0,20}$ ]] || die "WEFT_NS_PREFIX must match [a-z0-9][a-z0-9-]{0,20}"
  HOST_NS="$PREFIX-host"
  local timeout=${WEFT_READY_TIMEOUT:-120}
  BIN_DIR=${WEFT_BIN_DIR:-$("$HERE/install.sh" --print)}
  local b
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b missing: run $HERE/install.sh first"
  done
  for b in ip openssl curl setsid base64; do
    command -v "$b" >/dev/null || die "$b not found in PATH"
  done

  # Refuse to clobber a running cluster; otherwise start from a clean DIR.
  if [[ -d "$DIR/pids" ]]; then
    local f
    for f in "$DIR"/pids/*.pid; do
      [[ -e "$f" ]] || continue
      pid_alive "$f" && die "$(basename "$f" .pid) from a previous 'up $DIR' is still running: run '$0 down $DIR' first"
    done
  fi
  if [[ -s "$DIR/state/netns" ]]; then
    die "$DIR/state/netns lists namespaces of a previous run: run '$0 down $DIR' first"
  fi
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  rm -rf "${DIR:?}/etcd" "$DIR/pki" "$DIR/kubeconfig" "$DIR/logs" "$DIR/pids" "$DIR/state" "$DIR/kcm-certs"
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/state" "$DIR/kcm-certs"
  cat >"$DIR/state/env" <<EOF
PREFIX=$PREFIX
HOST_NS=$HOST_NS
NODES=$NODES
BIN_DIR=$BIN_DIR
EOF
  : >"$DIR/state/netns"

  # From here on, any failure or interrupt tears down what was started.
  # (set -e turns a failed command into an exit; die exits; both run the EXIT trap)
  UP_OK=0
  # The trap may fire while a command runs with stderr sent to /dev/null (wait_for):
  # fd 3 keeps the caller's stderr for the teardown messages (daemons get 3>&-).
  exec 3>&2
  trap 'rc=$?; if [[ $UP_OK != 1 ]]; then { log "up failed (exit $rc): tearing down"; cmd_down || true; } 2>&3; fi; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  local t0=$SECONDS
  make_pki
  write_rbac
  setup_netns

  local fsync=(--unsafe-no-fsync)
  [[ "${WEFT_ETCD_FSYNC:-0}" == 1 ]] && fsync=()
  start_in_ns etcd "$HOST_NS" "$BIN_DIR/etcd" \
    --name default --data-dir "$DIR/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --initial-cluster-state new \
    "${fsync[@]}" --log-level warn
  wait_for "etcd /health" "$timeout" "$DIR/pids/etcd.pid" \
    in_host curl -sf --max-time 3 http://127.0.0.1:2379/health

  local extra_api=() extra_kcm=()
  # shellcheck disable=SC2206
  [[ -n "${WEFT_APISERVER_EXTRA_ARGS:-}" ]] && extra_api=(${WEFT_APISERVER_EXTRA_ARGS})
  # shellcheck disable=SC2206
  [[ -n "${WEFT_KCM_EXTRA_ARGS:-}" ]] && extra_kcm=(${WEFT_KCM_EXTRA_ARGS})
  start_in_ns kube-apiserver "$HOST_NS" "$BIN_DIR/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --etcd-compaction-interval=0 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$HOST_IP" \
    --cert-dir="$DIR/pki" \
    --tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" \
    --requestheader-client-ca-file="$DIR/pki/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$DIR/pki/front-proxy-client.crt" \
    --proxy-client-key-file="$DIR/pki/front-proxy-client.key" \
    --authorization-mode=RBAC \
    --service-cluster-ip-range="$SERVICE_CIDRS" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$DIR/pki/sa.pub" \
    --service-account-signing-key-file="$DIR/pki/sa.key" \
    --profiling=false \
    --v=1 \
    "${extra_api[@]}"
  wait_for "kube-apiserver /readyz" "$timeout" "$DIR/pids/kube-apiserver.pid" readyz_ok

  admin_kubectl apply -f "$DIR/rbac.yaml" >"$DIR/logs/rbac-apply.log" 2>&1 ||
    { cat "$DIR/logs/rbac-apply.log" >&2; die "applying $DIR/rbac.yaml failed"; }
  log "applied RBAC: ClusterRole+ClusterRoleBinding weft-agent (group weft:agents)"

  local kcfg="$DIR/kubeconfig/controller-manager.kubeconfig"
  start_in_ns kube-controller-manager "$HOST_NS" "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$kcfg" --authentication-kubeconfig="$kcfg" --authorization-kubeconfig="$kcfg" \
    --bind-address=127.0.0.1 --secure-port=10257 --cert-dir="$DIR/kcm-certs" \
    --leader-elect=false \
    --controllers="$KCM_CONTROLLERS" \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$DIR/pki/sa.key" \
    --root-ca-file="$DIR/pki/ca.crt" \
    --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDRS" \
    --node-cidr-mask-size-ipv4=24 --node-cidr-mask-size-ipv6=64 \
    --service-cluster-ip-range="$SERVICE_CIDRS" \
    --v=1 \
    "${extra_kcm[@]}"
  wait_for "kube-controller-manager /healthz" "$timeout" "$DIR/pids/kube-controller-manager.pid" kcm_ok
  # Pods can only be admitted once their ServiceAccount exists: the first thing
  # the serviceaccount controller does, so this also proves the controllers run.
  wait_for "ServiceAccount default/default" "$timeout" "$DIR/pids/kube-controller-manager.pid" \
    admin_kubectl get serviceaccount default -n default

  UP_OK=1
  trap - EXIT INT TERM
  log "up in $((SECONDS - t0))s: apiserver $APISERVER_URL (netns $HOST_NS), admin kubeconfig $DIR/kubeconfig/admin.kubeconfig"
  log "try: $0 kubectl $DIR get --raw /readyz"
}

kill_pid() { # pid -> TERM, wait up to 10 s, KILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    [[ -d /proc/$pid ]] || return 0
    # a zombie child of ours counts as gone
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
  [[ -d "$DIR" ]] || { log "$DIR does not exist: nothing to do"; return 0; }
  local f name pid ns pids
  # 1. processes we started, newest first (controller-manager, apiserver, etcd)
  for name in kube-controller-manager kube-apiserver etcd; do
    f="$DIR/pids/$name.pid"
    if pid_alive "$f"; then
      read -r pid _ <"$f"
      log "stopping $name (pid $pid)"
      kill_pid "$pid"
    fi
    rm -f "$f"
  done
  for f in "$DIR"/pids/*.pid; do   # anything else recorded there
    [[ -e "$f" ]] || continue
    if pid_alive "$f"; then read -r pid _ <"$f"; log "stopping $(basename "$f" .pid) (pid $pid)"; kill_pid "$pid"; fi
    rm -f "$f"
  done
  # 2. whatever still runs inside the namespaces we created, then the namespaces
  if [[ -f "$DIR/state/netns" ]]; then
    local -a nss
    mapfile -t nss < <(tac "$DIR/state/netns")
    for ns in "${nss[@]}"; do
      [[ -n "$ns" ]] || continue
      if ip netns list | awk '{print $1}' | grep -x "$ns" >/dev/null; then
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        for pid in $pids; do
          log "stopping pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?')) left in netns $ns"
          kill_pid "$pid"
        done
        ip netns del "$ns" && log "deleted netns $ns" || log "WARNING: could not delete netns $ns"
      fi
    done
    # keep the record only if something is left behind
    local left=()
    for ns in "${nss[@]}"; do
      [[ -n "$ns" ]] && ip netns list | awk '{print $1}' | grep -x "$ns" >/dev/null && left+=("$ns")
    done
    if ((${#left[@]})); then
      printf '%s\n' "${left[@]}" >"$DIR/state/netns"
      log "WARNING: namespaces still present: ${left[*]}"
      return 1
    fi
    rm -f "$DIR/state/netns"
  fi
  log "down: $DIR (logs kept in $DIR/logs)"
}

cmd_status() {
  load_state
  local name f pid rc=0 out
  for name in etcd kube-apiserver kube-controller-manager; do
    f="$DIR/pids/$name.pid"
    if pid_alive "$f"; then
      read -r pid _ <"$f"; printf '%-24s alive (pid %s)\n' "$name" "$pid"
    else
      printf '%-24s not running\n' "$name"; rc=1
    fi
  done
  if ip netns list | awk '{print $1}' | grep -x "$HOST_NS" >/dev/null; then
    out=$(curl_api '/readyz' 2>&1) || true
    printf '%-24s %s\n' "apiserver /readyz" "${out:-no answer}"
    [[ "$out" == ok ]] || rc=1
  else
    printf '%-24s netns %s does not exist\n' "apiserver /readyz" "$HOST_NS"; rc=1
  fi
  if [[ -f "$DIR/state/netns" ]]; then
    printf '%-24s %s\n' "namespaces" "$(tr '\n' ' ' <"$DIR/state/netns")"
  fi
  return $rc
}

cmd_kubectl() {
  load_state
  admin_kubectl "$@"
}

cmd_restart() { # NAME [SIGNAL]
  load_state
  local name=${1:-} sig=${2:-TERM} f pid i argv=() ns
  case $name in
    etcd | kube-apiserver | kube-controller-manager) ;;
    *) die "restart: NAME must be etcd, kube-apiserver or kube-controller-manager" ;;
  esac
  [[ -s "$DIR/state/$name.argv" ]] || die "$DIR/state/$name.argv missing (cluster started by an older cluster.sh?)"
  mapfile -d '' argv <"$DIR/state/$name.argv"
  ns=${argv[0]}
  argv=("${argv[@]:1}")
  f="$DIR/pids/$name.pid"
  if pid_alive "$f"; then
    read -r pid _ <"$f"
    log "restart: sending SIG$sig to $name (pid $pid)"
    kill -s "$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do   # up to 10 s (as `down`); a zombie (not reaped by pid 1) counts as gone
      [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || break
      sleep 0.1
    done
    if [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
      log "restart: $name still alive after 10 s: KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
  else
    log "restart: $name was not running"
  fi
  local timeout=${WEFT_READY_TIMEOUT:-120}
  LOG_APPEND=1 start_in_ns "$name" "$ns" "${argv[@]}"
  case $name in
    etcd) wait_for "etcd /health" "$timeout" "$f" in_host curl -sf --max-time 3 http://127.0.0.1:2379/health ;;
    kube-apiserver) wait_for "kube-apiserver /readyz" "$timeout" "$f" readyz_ok ;;
    kube-controller-manager) wait_for "kube-controller-manager /healthz" "$timeout" "$f" kcm_ok ;;
  esac
}

[[ $# -ge 2 ]] || usage
CMD=$1 DIR=$2
shift 2
[[ "$(id -u)" == 0 ]] || die "must run as root (network namespaces)"
case $CMD in
  up) cmd_up ;;
  down)
    if [[ -f "$DIR/state/env" ]]; then load_state; fi
    DIR=$(cd "$DIR" 2>/dev/null && pwd || echo "$DIR")
    cmd_down ;;
  status) cmd_status ;;
  kubectl) cmd_kubectl "$@" ;;
  restart) cmd_restart "$@" ;;
  *) usage ;;
esac
