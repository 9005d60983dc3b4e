#!/usr/bin/env bash
# Cluster tier of issue 5: the weft agent against a real control plane.
#
#   conformance/k8s/agent-test.sh [DIR]     (default: a fresh temp dir, removed if all pass)
#
# Brings up cluster.sh with 2 node namespaces, creates Nodes node1/node2 (no kubelet: the
# harness plays it, pods get their status written through the status subresource), runs one
# `weft agent` per node namespace with that node's own identity (DIR/kubeconfig/node<i>, RBAC
# ClusterRole weft-agent from DIR/rbac.yaml), node1 through faultproxy.py (a TCP proxy in the
# host namespace that the test can cut, block and stall), node2 directly. Then:
#   1 readiness, table inet weft with its base chains (read with `nft -j` from outside)
#   2 pods, namespaces, policies reach each node's kernel; relabels move elements
#   3 /debug/state's applied resourceVersion per kind; API write -> kernel latency
#   4 faults on node1 (cut, stall, 410 Gone, apiserver SIGKILL), panics on node2
#   5 odd but accepted objects (legacy CIDR, unresolvable named port, 2000 labels, long names)
#   6 SIGTERM leaves the table untouched; a new agent adopts it with 0 nft ops
#
# Env: WEFT_NS_PREFIX (default weft-at), WEFT_CHECK_TIMEOUT (default 60 s per wait),
#      WEFT_AGENT_BIN (skip `cargo build`, use this weft binary), WEFT_STALL_TIMEOUT (default 90),
#      WEFT_AGENT_DATAPLANE=0 (agents run with --no-dataplane: policy enforcement only; default:
#      the agent as deployed, overlay + CNI service inside the node namespaces, state in DIR).
# Needs root, jq, curl, python3, nft. Touches nothing in the root network namespace: every
# nft command runs inside a node namespace, the proxy and the API clients in the host one.
# Prints a summary table and `agent-test: N passed, M failed`; exits non-zero on any failure.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER="$HERE/cluster.sh"
export WEFT_NS_PREFIX=${WEFT_NS_PREFIX:-weft-at}
export WEFT_NODES=2
# the API server's etcd compaction stays off (cluster.sh); the test compacts on purpose
TIMEOUT=${WEFT_CHECK_TIMEOUT:-60}
STALL=${WEFT_STALL_TIMEOUT:-90}
OWN_DIR=0
if [[ -n "${1:-}" ]]; then DIR=$1; else DIR=$(mktemp -d /tmp/weft-agent-test.XXXXXX); OWN_DIR=1; fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
T_START=$SECONDS

PREFIX=$WEFT_NS_PREFIX
HOSTNS="$PREFIX-host"
PROXY_ADDR=198.18.0.1:16443

# --- results --------------------------------------------------------------------------------
PASS=0 FAIL=0
RESULTS=()
SECTION=""
section() { SECTION=$1; echo; echo "=== $1: $2"; }
ok()  { PASS=$((PASS + 1)); RESULTS+=("PASS|$SECTION|$*"); printf 'ok   - %s\n' "$*"; }
bad() { FAIL=$((FAIL + 1)); RESULTS+=("FAIL|$SECTION|$*"); printf 'FAIL - %s\n' "$*"; }
check() { # description cmd...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
note() { printf '     %s\n' "$*"; }
LATENCIES=()
# retry cmd until it succeeds, at most $1 seconds
within() {
  local t=$1; shift
  local deadline=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
# cmd keeps failing for $1 seconds (the fault is real: nothing leaks through)
stays_false() {
  local t=$1; shift
  local deadline=$((SECONDS + t))
  while ((SECONDS < deadline)); do
    "$@" >/dev/null 2>&1 && return 1
    sleep 0.3
  done
  return 0
}
# all 'cmd1' 'cmd2' ...: each string is evaluated (again on every retry of `within`)
all() { local c; for c in "$@"; do eval "$c" || return 1; done; }

for t in jq ip curl openssl python3 nft setsid; do
  command -v "$t" >/dev/null || { echo "agent-test: $t is required" >&2; exit 1; }
done
[[ "$(id -u)" == 0 ]] || { echo "agent-test: must run as root (network namespaces)" >&2; exit 1; }

# --- build --------------------------------------------------------------------------------
BIN_DIR=$("$HERE/install.sh") || { echo "agent-test: install.sh failed" >&2; exit 1; }
export WEFT_BIN_DIR=$BIN_DIR
if [[ -n "${WEFT_AGENT_BIN:-}" ]]; then
  WEFT=$WEFT_AGENT_BIN
else
  echo "agent-test: cargo build --bin weft" >&2
  (cd "$ROOT" && cargo build --bin weft) || { echo "agent-test: cargo build failed" >&2; exit 1; }
  tdir=${CARGO_TARGET_DIR:-$ROOT/target}
  [[ "$tdir" == /* ]] || tdir="$ROOT/$tdir"
  WEFT="$tdir/debug/weft"
fi
[[ -x "$WEFT" ]] || { echo "agent-test: $WEFT is not executable" >&2; exit 1; }
# one binary for the whole run, even if someone rebuilds the shared target dir meanwhile
cp "$WEFT" "$DIR/weft" || { echo "agent-test: cannot copy $WEFT to $DIR" >&2; exit 1; }
WEFT="$DIR/weft"

# --- processes and teardown --------------------------------------------------------------------
declare -A AGENT_PID=()
PROXY_PID=""
teardown() {
  local i p
  for i in "${!AGENT_PID[@]}"; do
    p=${AGENT_PID[$i]}
    [[ -n "$p" ]] && kill -TERM "$p" 2>/dev/null
  done
  [[ -n "$PROXY_PID" ]] && kill -TERM "$PROXY_PID" 2>/dev/null
  for i in "${!AGENT_PID[@]}"; do
    p=${AGENT_PID[$i]}
    [[ -n "$p" ]] || continue
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  [[ -n "$PROXY_PID" ]] && kill -KILL "$PROXY_PID" 2>/dev/null
  "$CLUSTER" down "$DIR" >/dev/null 2>&1 || "$CLUSTER" down "$DIR" >&2
}
trap 'rc=$?; teardown; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nsof() { echo "$PREFIX-node$1"; }   # the only namespaces nft ever runs in
in_host() { ip netns exec "$HOSTNS" "$@"; }
K() { in_host "$BIN_DIR/kubectl" --kubeconfig "$DIR/kubeconfig/admin.kubeconfig" --request-timeout=20s "$@"; }
api() { # METHOD PATH [BODY]  (admin, from the host namespace; merge patch for PATCH)
  local ct=application/json
  [[ $1 == PATCH ]] && ct=application/merge-patch+json
  in_host curl -sS --max-time 10 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
    --key "$DIR/pki/admin.key" -X "$1" -H "Content-Type: $ct" ${3:+--data-binary "$3"} \
    "https://127.0.0.1:6443$2"
}
etcd() { # PATH JSON  (etcd's gRPC gateway, host namespace loopback)
  in_host curl -sS --max-time 10 -X POST "http://127.0.0.1:2379$1" -d "$2"
}
etcd_rev() { etcd /v3/kv/range '{"key":"AA==","limit":1}' | jq -r .header.revision; }
proxy() { curl -sS --max-time 5 --unix-socket "$DIR/proxy.sock" "http://proxy/$1"; }

# agent i kubeconfig [VAR=value ...]: starts `weft agent` for node<i> inside its namespace
start_agent() {
  local i=$1 kc=$2; shift 2
  local extra=(--state-dir "$DIR/state-node$i")
  [[ $i == 1 ]] && extra+=(--stall-timeout "$STALL")
  [[ "${WEFT_AGENT_DATAPLANE:-1}" == 0 ]] && extra+=(--no-dataplane)
  echo "---- start $(date +%T) $*" >>"$DIR/logs/agent$i.log"
  env NO_COLOR=1 RUST_BACKTRACE=1 "$@" setsid ip netns exec "$(nsof "$i")" "$WEFT" agent \
    --node "node$i" --kubeconfig "$kc" --metrics-addr 127.0.0.1:6784 \
    --socket "$DIR/agent$i.sock" "${extra[@]}" </dev/null >>"$DIR/logs/agent$i.log" 2>&1 &
  AGENT_PID[$i]=$!
}
stop_agent() { # i  -> SIGTERM, wait (bounded); returns the exit status (or 124)
  local i=$1 p=${AGENT_PID[$1]:-} rc
  [[ -n "$p" ]] || return 0
  kill -TERM "$p" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then kill -KILL "$p"; wait "$p" 2>/dev/null; AGENT_PID[$i]=""; return 124; fi
  wait "$p" 2>/dev/null; rc=$?
  AGENT_PID[$i]=""
  return $rc
}
alive() { [[ -n "${AGENT_PID[$1]:-}" ]] && kill -0 "${AGENT_PID[$1]}" 2>/dev/null; }
KC1="$DIR/kubeconfig/node1-via-proxy.kubeconfig"
KC2="$DIR/kubeconfig/node2.kubeconfig"

# --- agent endpoints -------------------------------------------------------------------------
readyz_code() { ip netns exec "$(nsof "$1")" curl -s -o /dev/null -w '%{http_code}' --max-time 3 http://127.0.0.1:6784/readyz 2>/dev/null; }
ready() { [[ "$(readyz_code "$1")" == 200 ]]; }
metrics() { ip netns exec "$(nsof "$1")" curl -s --max-time 3 http://127.0.0.1:6784/metrics 2>/dev/null; }
# metric i NAME [LABEL-TEXT...]: sum of NAME's samples whose labels contain every LABEL-TEXT
metric() {
  local i=$1 name=$2 line sum=0 want ok; shift 2
  while read -r line; do
    [[ "$line" == "$name "* || "$line" == "$name{"* ]] || continue
    ok=1
    for want in "$@"; do [[ "$line" == *"$want"* ]] || ok=0; done
    ((ok)) && sum=$((sum + ${line##* }))
  done < <(metrics "$i")
  echo "$sum"
}
http_code() { ip netns exec "$(nsof "$1")" curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:6784$2" 2>/dev/null; }
state() { curl -s --max-time 3 --unix-socket "$DIR/agent$1.sock" http://agent/debug/state 2>/dev/null; }
applied_rv() { state "$1" | jq -r --arg k "$2" '.kinds[$k].applied_resource_version // "0"'; }
applied_ge() { local v; v=$(applied_rv "$1" "$2"); [[ "$v" =~ ^[0-9]+$ ]] && (($v >= $3)); }

# --- the kernel, read independently with nft -j inside the node namespace -------------------------
JQLIB='
def norm: if type == "string" then .
  elif type == "number" then tostring
  elif type == "object" and has("range") then "\(.range[0])-\(.range[1])"
  elif type == "object" and has("prefix") then "\(.prefix.addr)/\(.prefix.len)"
  elif type == "object" and has("concat") then (.concat | map(norm) | join(" . "))
  elif type == "object" and has("elem") then (.elem.val | norm)
  else tojson end;
def verdict: if type == "object" and has("jump") then "jump \(.jump.target)"
  elif type == "object" and has("goto") then "goto \(.goto.target)" else tojson end;
def weft: .nftables[] | select((.[keys[0]] | type) == "object" and .[keys[0]].table? == "weft" and .[keys[0]].family? == "inet");
'
nftj() { ip netns exec "$(nsof "$1")" nft -j list ruleset; }
nq() { # i jq-filter [jq args...]   (filter runs on the ruleset JSON, JQLIB defined)
  local i=$1 f=$2; shift 2
  nftj "$i" | jq -r "$@" "$JQLIB $f"
}
# normalized elements of set/map NAME: "addr", "a-b", "a/len", "a . tcp . 80", "key : jump chain"
elems() { nq "$1" 'weft | (.set // .map // empty) | select(.name == $n) | (.elem // [])[] |
  if type == "array" then "\(.[0] | norm) : \(.[1] | verdict)" else norm end' --arg n "$2"; }
has_elem() { elems "$1" "$2" | grep -xF -- "$3" >/dev/null; }
lacks_elem() { ! has_elem "$@" && nftj "$1" >/dev/null; }
map_key() { elems "$1" "$2" | grep -- "^$3 : " >/dev/null; }
no_map_key() { ! map_key "$@" && nftj "$1" >/dev/null; }
# pol- chains whose rules' comments name policy NS/NAME
pol_chains() { nq "$1" 'weft | .rule? // empty | select(.chain | startswith("pol-"))
  | select((.comment // "") | startswith($p + " ")) | .chain' --arg p "$2" | sort -u; }
has_pol_chain() { [[ -n "$(pol_chains "$1" "$2")" ]]; }
no_pol_chain() { nftj "$1" >/dev/null && [[ -z "$(pol_chains "$1" "$2")" ]]; }
# sets referenced (as @name) by the rules of chain C whose comment starts with PREFIX
rule_sets() { nq "$1" 'weft | .rule? // empty | select(.chain == $c)
  | select((.comment // "") | startswith($p)) | [.. | strings | select(startswith("@")) | ltrimstr("@")] | .[]' \
  --arg c "$2" --arg p "${3:-}" | sort -u; }
# set i PREFIX-of-set-name in the rules of policy P's chain with comment prefix CP, family -v4
pol_set() { # i policy(ns/name) comment-prefix set-kind(sel|nport|cidr|nssel...)
  local c
  c=$(pol_chains "$1" "$2" | sed -n 1p)
  [[ -n "$c" ]] || return 1
  rule_sets "$1" "$c" "$3" | grep -E "^$4-.*-v4\$" | sed -n 1p
}
set_has() { local s; s=$(pol_set "$1" "$2" "$3" "$4") && [[ -n "$s" ]] && has_elem "$1" "$s" "$5"; }
set_lacks() { local s; s=$(pol_set "$1" "$2" "$3" "$4") && [[ -n "$s" ]] && ! has_elem "$1" "$s" "$5"; }
# the ruleset with counters zeroed and the metainfo dropped, for before/after comparisons
ruleset_norm() { nftj "$1" | jq -S '.nftables | map(select(has("metainfo") | not))
  | walk(if type == "object" and has("counter") then .counter = {} else . end)'; }
# only table inet weft (the policy table) of a ruleset_norm file
weft_only() { jq -S 'map(select(.[keys[0]] | (.table? // .name?) as $t | (.family? == "inet") and ($t == "weft")))' "$1"; }

# --- objects --------------------------------------------------------------------------------------
NODE_CIDR=()
wait_sa() { within "$TIMEOUT" K get serviceaccount default -n "$1"; }
# mkpod NS NAME NODE IP LABELS-JSON [CONTAINER-PORTS-JSON] -> prints the resourceVersion of
# the status write (the pod gets its IP there, as a kubelet would report it)
mkpod() {
  local ns=$1 name=$2 node=$3 ip=$4 labels=$5 ports=${6:-'[{"name":"http","containerPort":8080,"protocol":"TCP"}]'}
  jq -n --arg ns "$ns" --arg n "$name" --arg node "$node" --argjson l "$labels" --argjson p "$ports" \
    '{apiVersion:"v1",kind:"Pod",metadata:{name:$n,namespace:$ns,labels:$l},
      spec:{nodeName:$node,containers:[{name:"c",image:"registry.invalid/weft-test:none",ports:$p}]}}' \
    >"$DIR/pod.json"
  K create -f "$DIR/pod.json" -o name >/dev/null || return 1
  K patch pod "$name" -n "$ns" --subresource=status --type=merge \
    -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip\",\"podIPs\":[{\"ip\":\"$ip\"}]}}" \
    -o jsonpath='{.metadata.resourceVersion}'
}
relabel_pod() { # NS NAME LABELS-MERGE-JSON -> rv
  K patch pod "$2" -n "$1" --type=merge -p "{\"metadata\":{\"labels\":$3}}" -o jsonpath='{.metadata.resourceVersion}'
}
apply_json() { # JSON on stdin -> rv
  K apply -f - -o jsonpath='{.metadata.resourceVersion}'
}

# timed API write -> kernel: WHAT KIND METHOD PATH BODY. timedwrite.py (in the host namespace,
# connection to the API already open) starts the clock just before the request, then polls each
# agent's /debug/state on its unix socket every millisecond until the applied resourceVersion of
# KIND is >= the write's (/debug/state only reports what is in the kernel). For a DELETE (whose
# answer has no resourceVersion) it takes the deletion's from a watch.
timed_write() {
  local what=$1 kind=$2 out rv ans i
  out=$(in_host python3 "$HERE/timedwrite.py" --server https://127.0.0.1:6443 --ca "$DIR/pki/ca.crt" \
    --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" --kind "$kind" --method "$3" --path "$4" \
    --body "${5:-}" --agent "1=$DIR/agent1.sock" --agent "2=$DIR/agent2.sock" --timeout "$TIMEOUT")
  rv=$(jq -r '.rv // empty' <<<"$out" 2>/dev/null)
  if ! [[ "$rv" =~ ^[0-9]+$ ]]; then bad "$what: the API took the write ($out)"; return 1; fi
  ans=$(jq -r .answered_ms <<<"$out")
  local -A lat=()
  for i in 1 2; do
    lat[$i]=$(jq -r --arg i "$i" '.applied_ms[$i] // empty' <<<"$out")
    if [[ -n "${lat[$i]}" ]]; then
      ok "$what: node$i applied_resource_version[$kind] >= $rv after ${lat[$i]} ms"
    else
      bad "$what: node$i applied_resource_version[$kind] >= $rv within ${TIMEOUT}s (has $(applied_rv "$i" "$kind"))"
    fi
  done
  LATENCIES+=("$(printf '%-46s rv %-5s API answered %5s ms | node1 %7s ms  node2 %7s ms' "$what" "$rv" "$ans" "${lat[1]:-timeout}" "${lat[2]:-timeout}")")
}

# ================================================================================================
section 0 "cluster up (WEFT_NODES=2, prefix $PREFIX, dir $DIR)"
if ! "$CLUSTER" up "$DIR"; then
  bad "cluster.sh up $DIR"
  echo "agent-test: $PASS passed, $FAIL failed"
  exit 1
fi
ok "cluster.sh up"
for i in 1 2; do
  K create -f - -o name >/dev/null <<EOF
{"apiVersion":"v1","kind":"Node","metadata":{"name":"node$i","labels":{"weft.test/node":"$i"}}}
EOF
  # what a kubelet would report: the node's underlay address (the agent's overlay uses it)
  K patch node "node$i" --subresource=status --type=merge -o name \
    -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"198.18.0.$((10 + i))\"}]}}" >/dev/null
done
podcidr() { K get node "node$1" -o jsonpath='{.spec.podCIDRs[0]}' 2>/dev/null | grep -E '^10\.244\.[0-9]+\.0/24$'; }
for i in 1 2; do
  check "Node node$i gets a podCIDR from the controller-manager" within "$TIMEOUT" podcidr "$i"
  c=$(podcidr "$i"); NODE_CIDR[$i]=${c%.0/24}   # "10.244.X"
  note "node$i podCIDR ${c:-none}"
done
[[ -n "${NODE_CIDR[1]:-}" && -n "${NODE_CIDR[2]:-}" ]] || { echo "agent-test: no podCIDRs, giving up"; exit 1; }
N1=${NODE_CIDR[1]} N2=${NODE_CIDR[2]}

# the fault proxy for node1, in the host namespace (198.18.0.1 is in the serving cert's SANs)
in_host python3 "$HERE/faultproxy.py" --listen "$PROXY_ADDR" --upstream 127.0.0.1:6443 \
  --control "$DIR/proxy.sock" </dev/null >"$DIR/logs/faultproxy.log" 2>&1 &
PROXY_PID=$!
check "fault proxy up on $PROXY_ADDR" within 10 proxy stats
sed "s#https://198.18.0.1:6443#https://$PROXY_ADDR#" "$DIR/kubeconfig/node1.kubeconfig" >"$KC1"
chmod 600 "$KC1"
check "node1's kubeconfig (identity node1) points at the proxy" grep -q "server: https://$PROXY_ADDR" "$KC1"

# ================================================================================================
section 1 "agents ready, table inet weft with its base chains"
start_agent 1 "$KC1"
start_agent 2 "$KC2"
for i in 1 2; do
  check "node$i agent /readyz 200 within ${TIMEOUT}s" within "$TIMEOUT" ready "$i"
  check "node$i agent /healthz 200" all "[[ \$(http_code $i /healthz) == 200 ]]"
  check "node$i: nft -j list ruleset (inside $(nsof "$i")) has table inet weft" \
    all "nftj $i | jq -e '.nftables[] | select(.table? and .table.family == \"inet\" and .table.name == \"weft\")' >/dev/null"
  check "node$i: base chains egress (hook forward, prio -1) and ingress (hook forward, prio 0), policy accept" \
    all "nftj $i | jq -e '[.nftables[] | .chain? // empty | select(.table == \"weft\" and .hook == \"forward\" and .policy == \"accept\") | \"\(.name):\(.prio)\"] | sort == [\"egress:-1\", \"ingress:0\"]' >/dev/null"
  check "node$i: sets pods-local-v4/v6 and maps ingress/egress-dispatch-v4/v6 exist" \
    all "nftj $i | jq -e '[.nftables[] | (.set // .map // empty) | select(.table == \"weft\") | .name] as \$n | [\"pods-local-v4\",\"pods-local-v6\",\"ingress-dispatch-v4\",\"ingress-dispatch-v6\",\"egress-dispatch-v4\",\"egress-dispatch-v6\"] - \$n == []' >/dev/null"
done
for i in 1 2; do
  note "node$i dataplane: $(grep -m1 -oE 'dataplane ready.*|dataplane not ready.*' "$DIR/logs/agent$i.log" | cut -c1-150 || echo 'no word yet')"
done
# the node identities (group weft:agents) are bound to cluster.sh's ClusterRole weft-agent: it
# must grant exactly what manifests/rbac.yaml grants the DaemonSet's ServiceAccount
rbac_rules() { jq -S '[.rules[] | {apiGroups, resources: (.resources | sort), verbs: (.verbs | sort)}] | sort'; }
check "ClusterRole weft-agent in the cluster == the one in manifests/rbac.yaml" all \
  "[[ -f '$ROOT/manifests/rbac.yaml' ]]" \
  "diff <(K get clusterrole weft-agent -o json | rbac_rules) <(K create --dry-run=client -f '$ROOT/manifests/rbac.yaml' -o json | jq 'if .kind == \"List\" then .items[] else . end | select(.kind == \"ClusterRole\")' | rbac_rules) >&2"
check "the agent identity may watch pods but not read secrets (RBAC weft-agent, DIR/rbac.yaml)" all \
  "[[ \$(ip netns exec $(nsof 2) '$BIN_DIR/kubectl' --kubeconfig '$KC2' auth can-i watch pods -A) == yes ]]" \
  "[[ \$(ip netns exec $(nsof 2) '$BIN_DIR/kubectl' --kubeconfig '$KC2' auth can-i list secrets -A) == no ]]"

# ================================================================================================
section 2 "pods, namespaces and policies reach each node's kernel"
K create namespace at-a -o name >/dev/null
K label namespace at-a team=alpha >/dev/null
K create namespace at-b -o name >/dev/null
check "ServiceAccount default in at-a and at-b" all "wait_sa at-a" "wait_sa at-b"
WEB1=$N1.10 CLI1=$N1.11 WEB2=$N2.10 CLI2=$N2.12 OTH1=$N1.13 B1=$N1.20 B2=$N2.20
mkpod at-a web1 node1 "$WEB1" '{"app":"web"}' >/dev/null
mkpod at-a cli1 node1 "$CLI1" '{"role":"client"}' >/dev/null
mkpod at-a web2 node2 "$WEB2" '{"app":"web"}' >/dev/null
mkpod at-a cli2 node2 "$CLI2" '{"role":"client"}' >/dev/null
mkpod at-a oth1 node1 "$OTH1" '{"role":"other"}' >/dev/null
mkpod at-b b1 node1 "$B1" '{"role":"client"}' >/dev/null
mkpod at-b b2 node2 "$B2" '{"role":"client"}' >/dev/null
check "node1: local pod IPs in pods-local-v4" within "$TIMEOUT" all \
  "has_elem 1 pods-local-v4 $WEB1" "has_elem 1 pods-local-v4 $CLI1" "has_elem 1 pods-local-v4 $OTH1" "has_elem 1 pods-local-v4 $B1"
check "node2: local pod IPs in pods-local-v4" within "$TIMEOUT" all \
  "has_elem 2 pods-local-v4 $WEB2" "has_elem 2 pods-local-v4 $CLI2" "has_elem 2 pods-local-v4 $B2"
check "node1: node2's pods are not in node1's pods-local-v4" lacks_elem 1 pods-local-v4 "$WEB2"

cat >"$DIR/web-in.json" <<'EOF'
{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"web-in","namespace":"at-a"},
 "spec":{"podSelector":{"matchLabels":{"app":"web"}},
  "ingress":[
   {"from":[{"podSelector":{"matchLabels":{"role":"client"}}}],"ports":[{"protocol":"TCP","port":"http"}]},
   {"from":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.244.0.0/16"]}}],"ports":[{"protocol":"TCP","port":9000}]}]}}
EOF
RV_WEBIN=$(apply_json <"$DIR/web-in.json")
check "NetworkPolicy at-a/web-in created (rv $RV_WEBIN)" test -n "$RV_WEBIN"
IN0="'at-a/web-in ingress[0]'" IN1="'at-a/web-in ingress[1]'"
for i in 1 2; do
  web=$WEB1; [[ $i == 2 ]] && web=$WEB2
  check "node$i: isolated local pod $web has an ingress-dispatch-v4 element" within "$TIMEOUT" map_key "$i" ingress-dispatch-v4 "$web"
  check "node$i: a pol- chain whose rule comments name at-a/web-in" within "$TIMEOUT" has_pol_chain "$i" at-a/web-in
  note "node$i chain: $(pol_chains "$i" at-a/web-in | tr '\n' ' ')"
  check "node$i: peer set of ingress[0] holds the client pods of both nodes ($CLI1, $CLI2)" within "$TIMEOUT" all \
    "set_has $i at-a/web-in $IN0 sel $CLI1" "set_has $i at-a/web-in $IN0 sel $CLI2"
  check "node$i: ... but not the role=other pod nor the other namespace's client" all \
    "set_lacks $i at-a/web-in $IN0 sel $OTH1" "set_lacks $i at-a/web-in $IN0 sel $B1"
  check "node$i: named port http resolved to '$web . tcp . 8080' (local pods only)" all \
    "set_has $i at-a/web-in $IN0 nport '$web . tcp . 8080'" "[[ \$(elems $i \$(pol_set $i at-a/web-in $IN0 nport) | wc -l) == 1 ]]"
  check "node$i: ipBlock 10.0.0.0/8 except 10.244.0.0/16 as two ranges" all \
    "set_has $i at-a/web-in $IN1 cidr 10.0.0.0-10.243.255.255" "set_has $i at-a/web-in $IN1 cidr 10.245.0.0-10.255.255.255"
done
check "node1: a pod no policy selects ($CLI1) has no ingress-dispatch element" no_map_key 1 ingress-dispatch-v4 "$CLI1"

# a pod relabel moves its IP between sets
relabel_pod at-a oth1 '{"role":"client"}' >/dev/null
for i in 1 2; do
  check "pod oth1 relabelled role=client: node$i peer set gains $OTH1" within "$TIMEOUT" all "set_has $i at-a/web-in $IN0 sel $OTH1"
done
relabel_pod at-a cli2 '{"role":"gone"}' >/dev/null
for i in 1 2; do
  check "pod cli2 relabelled role=gone: node$i peer set drops $CLI2" within "$TIMEOUT" all "set_lacks $i at-a/web-in $IN0 sel $CLI2"
done
relabel_pod at-a cli2 '{"role":"client"}' >/dev/null
relabel_pod at-a web1 '{"app":"idle"}' >/dev/null
check "pod web1 relabelled app=idle: node1 drops its ingress-dispatch element" within "$TIMEOUT" no_map_key 1 ingress-dispatch-v4 "$WEB1"
relabel_pod at-a web1 '{"app":"web"}' >/dev/null
check "pod web1 back to app=web: node1 dispatches it again" within "$TIMEOUT" map_key 1 ingress-dispatch-v4 "$WEB1"

# a namespace relabel with a namespaceSelector policy
cat >"$DIR/from-team.json" <<'EOF'
{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"from-team","namespace":"at-a"},
 "spec":{"podSelector":{"matchLabels":{"app":"web"}},
  "ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"team":"beta"}},"podSelector":{"matchLabels":{"role":"client"}}}]}]}}
EOF
apply_json <"$DIR/from-team.json" >/dev/null
check "node1: a pol- chain for at-a/from-team" within "$TIMEOUT" has_pol_chain 1 at-a/from-team
nssel() { # i -> the -v4 peer set of from-team's ingress[0]
  local c; c=$(pol_chains "$1" at-a/from-team | sed -n 1p); [[ -n "$c" ]] && rule_sets "$1" "$c" "at-a/from-team ingress[0]" | grep -E -- '-v4$' | sed -n 1p
}
nssel_has() { local s; s=$(nssel "$1") && [[ -n "$s" ]] && has_elem "$1" "$s" "$2"; }
nssel_lacks() { local s; s=$(nssel "$1") && [[ -n "$s" ]] && ! has_elem "$1" "$s" "$2"; }
check "node1: from-team's peer set lacks at-b's pods while no namespace has team=beta" within "$TIMEOUT" nssel_lacks 1 "$B1"
K label namespace at-b team=beta >/dev/null
for i in 1 2; do
  check "namespace at-b labelled team=beta: node$i from-team peer set gains $B1 and $B2" within "$TIMEOUT" all \
    "nssel_has $i $B1" "nssel_has $i $B2"
done
K label namespace at-b team=gamma --overwrite >/dev/null
for i in 1 2; do
  check "namespace at-b relabelled team=gamma: node$i from-team peer set drops $B1 and $B2" within "$TIMEOUT" all \
    "nssel_lacks $i $B1" "nssel_lacks $i $B2"
done

# deleting a policy removes its chain (possibly one reconcile later: a chain still referenced
# is deleted after its last reference is gone)
K delete networkpolicy from-team -n at-a >/dev/null
for i in 1 2; do
  check "policy from-team deleted: node$i has no chain for it" within "$TIMEOUT" no_pol_chain "$i" at-a/from-team
done

# ================================================================================================
section 3 "applied resourceVersion per kind on /debug/state; API write -> kernel latency"
check "node1 /debug/state (unix socket) is JSON with the four kinds" all \
  "state 1 | jq -e '.kinds | keys == [\"namespaces\",\"networkpolicies\",\"nodes\",\"pods\"]' >/dev/null"
check "/debug/state is not served on TCP (404)" all "[[ \$(http_code 1 /debug/state) == 404 ]]"
timed_write "pod label (at-a/cli1 lat=1)" pods PATCH /api/v1/namespaces/at-a/pods/cli1 \
  '{"metadata":{"labels":{"lat":"1"}}}'
timed_write "pod create (at-a/lat1 on node1, no IP yet)" pods POST /api/v1/namespaces/at-a/pods \
  '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"lat1","labels":{"role":"client"}},"spec":{"nodeName":"node1","containers":[{"name":"c","image":"x"}]}}'
timed_write "pod status: IP of at-a/lat1 (kubelet's write)" pods PATCH /api/v1/namespaces/at-a/pods/lat1/status \
  "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$N1.30\",\"podIPs\":[{\"ip\":\"$N1.30\"}]}}"
check "the kernel shows it: node1 pods-local-v4 and node2's web-in peer set hold $N1.30" all \
  "has_elem 1 pods-local-v4 $N1.30" "set_has 2 at-a/web-in $IN0 sel $N1.30"
timed_write "namespace label (at-b team=delta)" namespaces PATCH /api/v1/namespaces/at-b \
  '{"metadata":{"labels":{"team":"delta"}}}'
timed_write "policy create (at-a/lat-pol)" networkpolicies POST /apis/networking.k8s.io/v1/namespaces/at-a/networkpolicies \
  '{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"lat-pol"},"spec":{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"lat":"1"}}}]}]}}'
check "the kernel shows it: both nodes have a chain for at-a/lat-pol" all "has_pol_chain 1 at-a/lat-pol" "has_pol_chain 2 at-a/lat-pol"
timed_write "policy update (at-a/lat-pol port 81)" networkpolicies PATCH /apis/networking.k8s.io/v1/namespaces/at-a/networkpolicies/lat-pol \
  '{"spec":{"ingress":[{"from":[{"podSelector":{"matchLabels":{"lat":"1"}}}],"ports":[{"port":81}]}]}}'
check "the kernel shows it: node1's lat-pol rule matches port 81" all \
  "nq 1 'weft | .rule? // empty | select((.comment // \"\") | startswith(\"at-a/lat-pol \")) | .expr[] | .match? // empty | .right' | grep -x 81 >/dev/null"
timed_write "policy delete (at-a/lat-pol)" networkpolicies DELETE /apis/networking.k8s.io/v1/namespaces/at-a/networkpolicies/lat-pol ''
check "the kernel shows it: no chain for at-a/lat-pol (at most one reconcile later)" within "$TIMEOUT" all \
  "no_pol_chain 1 at-a/lat-pol" "no_pol_chain 2 at-a/lat-pol"
timed_write "node label (node2)" nodes PATCH /api/v1/nodes/node2 '{"metadata":{"labels":{"lat":"1"}}}'
for i in 1 2; do
  check "node$i: weft_policy_realization_seconds_count > 0" all "(( \$(metric $i weft_policy_realization_seconds_count) > 0 ))"
done
echo "     API write -> kernel (from just before the write until /debug/state on the node shows it):"
printf '       %s\n' "${LATENCIES[@]}"
for i in 1 2; do
  note "node$i weft_policy_realization_seconds (watch event -> kernel ack, in the agent): count $(metric $i weft_policy_realization_seconds_count), mean $(metrics $i | awk '$1 == "weft_policy_realization_seconds_sum" {s = $2} $1 == "weft_policy_realization_seconds_count" {c = $2} END {if (c) printf "%.1f ms", 1000 * s / c}')"
done

# ================================================================================================
section 5 "odd but accepted objects"
# 5a. an ipBlock with host bits set. Kubernetes 1.37 refuses it on create (StrictIPCIDRValidation,
# beta, on by default) but keeps serving such objects stored before, and lets them be updated
# (ratcheting). So it is written straight into etcd as JSON, as an older cluster would have it,
# read back and updated through the API, and must be enforced masked.
if out=$(K apply -f - -o name 2>&1 <<'EOF'
{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"odd-cidr-api","namespace":"at-a"},
 "spec":{"podSelector":{"matchLabels":{"app":"web"}},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.1.5/16"}}]}]}}
EOF
); then
  note "the API accepted an ipBlock with host bits on create ($out)"
else
  note "the API refuses host bits on create: $(echo "$out" | tr '\n' ' ' | cut -c1-170)"
fi
uid=$(cat /proc/sys/kernel/random/uuid)
val=$(jq -cn --arg uid "$uid" --arg now "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  '{kind:"NetworkPolicy",apiVersion:"networking.k8s.io/v1",
    metadata:{name:"odd-cidr",namespace:"at-a",uid:$uid,creationTimestamp:$now,generation:1},
    spec:{podSelector:{matchLabels:{app:"web"}},policyTypes:["Ingress"],
          ingress:[{from:[{ipBlock:{cidr:"10.244.1.5/16",except:["10.244.1.7/24"]}}]}]}}')
put=$(jq -cn --arg k "$(printf %s /registry/networkpolicies/at-a/odd-cidr | base64 -w0)" \
  --arg v "$(printf %s "$val" | base64 -w0)" '{key:$k,value:$v}')
check "legacy policy at-a/odd-cidr (cidr 10.244.1.5/16 except 10.244.1.7/24) written into etcd" \
  all "etcd /v3/kv/put '$put' | jq -e .header.revision >/dev/null"
check "the API serves it back unchanged" within "$TIMEOUT" all \
  "[[ \$(K get networkpolicy odd-cidr -n at-a -o jsonpath='{.spec.ingress[0].from[0].ipBlock.cidr}') == 10.244.1.5/16 ]]"
check "the API accepts an update of it (ratcheting: a label; the API warns)" all "K label networkpolicy odd-cidr -n at-a weft.test/touched=yes >/dev/null"
for i in 1 2; do
  check "node$i: odd-cidr enforced masked: 10.244.0.0/16 except 10.244.1.0/24" within "$TIMEOUT" all \
    "s=\$(pol_set $i at-a/odd-cidr 'at-a/odd-cidr ingress[0]' cidr)" \
    "[[ \$(elems $i \$s | sort | tr '\n' ' ') == '10.244.0.0/24 10.244.2.0-10.244.255.255 ' ]]"
done

# 5a'. an IPv4-mapped IPv6 ipBlock, also refused on create since 1.37 (same gate), also stored
# through etcd. Kubernetes' own helpers (netutils: an IP whose To4() is not nil is IPv4) read
# "::ffff:10.244.0.0/112" as the IPv4 block 10.244.0.0/16. Reported here, not asserted: the
# engine's model (netpol/, not this test's to change) decides the family of a CIDR.
val=$(jq -cn --arg uid "$(cat /proc/sys/kernel/random/uuid)" --arg now "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  '{kind:"NetworkPolicy",apiVersion:"networking.k8s.io/v1",
    metadata:{name:"odd-mapped",namespace:"at-a",uid:$uid,creationTimestamp:$now,generation:1},
    spec:{podSelector:{matchLabels:{app:"web"}},policyTypes:["Ingress"],
          ingress:[{from:[{ipBlock:{cidr:"::ffff:10.244.0.0/112"}}]}]}}')
put=$(jq -cn --arg k "$(printf %s /registry/networkpolicies/at-a/odd-mapped | base64 -w0)" \
  --arg v "$(printf %s "$val" | base64 -w0)" '{key:$k,value:$v}')
etcd /v3/kv/put "$put" >/dev/null
K label networkpolicy odd-mapped -n at-a weft.test/touched=yes >/dev/null 2>"$DIR/mapped-warn.txt"
note "API on an update of ipBlock ::ffff:10.244.0.0/112: $(tr '\n' ' ' <"$DIR/mapped-warn.txt" | cut -c1-200)"
if within "$TIMEOUT" has_pol_chain 1 at-a/odd-mapped; then
  c=$(pol_chains 1 at-a/odd-mapped | sed -n 1p)
  for s in $(rule_sets 1 "$c"); do
    note "node1 enforces odd-mapped with set $s: $(elems 1 "$s" | tr '\n' ' ')"
    [[ "$s" == *-v6 ]] && note "KNOWN GAP (netpol model): the API means the IPv4 block 10.244.0.0/16; weft compiles an IPv6 set that no IPv4 packet can match (fails closed)"
  done
else
  note "node1 has no chain for odd-mapped"
fi
K delete networkpolicy odd-mapped -n at-a >/dev/null

# 5b. a named port that resolves nowhere: accepted, no crash, its rule matches nothing
apply_json >/dev/null <<'EOF'
{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"odd-noport","namespace":"at-a"},
 "spec":{"podSelector":{"matchLabels":{"app":"web"}},
  "ingress":[{"from":[{"podSelector":{"matchLabels":{"role":"client"}}}],"ports":[{"port":"nosuch"}]}]}}
EOF
check "node1: a chain for at-a/odd-noport" within "$TIMEOUT" has_pol_chain 1 at-a/odd-noport
noport_matches_nothing() { # every rule of the chain matches through an empty named-port set
  local c s n=0
  c=$(pol_chains 1 at-a/odd-noport | sed -n 1p); [[ -n "$c" ]] || return 1
  [[ "$(nq 1 'weft | .rule? // empty | select(.chain == $c) | [.. | strings | select(startswith("@nport-"))] | length == 1' --arg c "$c" | sort -u)" == true ]] || return 1
  for s in $(rule_sets 1 "$c" | grep '^nport-'); do
    n=$((n + $(elems 1 "$s" | wc -l)))
  done
  ((n == 0))
}
check "node1: every rule of odd-noport needs its named-port set, and that set is empty" noport_matches_nothing
check "node1: web1 stays isolated (dispatch element kept)" map_key 1 ingress-dispatch-v4 "$WEB1"

# 5c. a pod with 2,000 labels
jq -n '[range(0; 2000) | {key: "k\(.)", value: "v\(.)"}] | from_entries + {"role": "client"}' >"$DIR/labels.json"
check "pod at-a/many-labels with $(jq length "$DIR/labels.json") labels created" \
  all "mkpod at-a many-labels node1 $N1.40 \"\$(cat $DIR/labels.json)\" >/dev/null"
check "node1: its IP in pods-local-v4" within "$TIMEOUT" has_elem 1 pods-local-v4 "$N1.40"
for i in 1 2; do
  check "node$i: its IP in web-in's role=client peer set" within "$TIMEOUT" all "set_has $i at-a/web-in $IN0 sel $N1.40"
done

# 5d. very long names: a 63-char namespace, 253-char policy and pod names, a long label key
LNS=at-long-$(printf 'n%.0s' $(seq 1 55))          # 63 chars (the maximum for a namespace)
LPOL=$(printf 'p%.0s' $(seq 1 241))-long-policy     # 253 chars
LPOD=$(printf 'q%.0s' $(seq 1 253))                 # 253 chars
LKEY=weft.example.com/$(printf 'k%.0s' $(seq 1 63))
LVAL=$(printf 'v%.0s' $(seq 1 63))
K create namespace "$LNS" -o name >/dev/null
wait_sa "$LNS"
check "namespace with a ${#LNS}-char name created" all "K get namespace $LNS -o name >/dev/null"
check "pod with a ${#LPOD}-char name on node1" all "mkpod $LNS $LPOD node1 $N1.50 '{\"app\":\"long\"}' >/dev/null 2>&1"
mkpod "$LNS" lclient node2 "$N2.50" "{\"$LKEY\":\"$LVAL\"}" >/dev/null
jq -n --arg ns "$LNS" --arg n "$LPOL" --arg k "$LKEY" --arg v "$LVAL" \
  '{apiVersion:"networking.k8s.io/v1",kind:"NetworkPolicy",metadata:{name:$n,namespace:$ns},
    spec:{podSelector:{matchLabels:{app:"long"}},
          ingress:[{from:[{podSelector:{matchLabels:{($k):$v}}}],ports:[{port:"http"},{port:8080}]}]}}' >"$DIR/long.json"
check "policy with a ${#LPOL}-char name accepted" all "K create -f $DIR/long.json -o name >/dev/null"
long_chain() { # the pol- chain the long pod's group chain jumps to
  local grp
  grp=$(elems 1 ingress-dispatch-v4 | awk -v ip="$N1.50" '$1 == ip && $3 == "jump" {print $4}')
  [[ -n "$grp" ]] || return 1
  nq 1 'weft | .rule? // empty | select(.chain == $g) | .expr[] | .jump?.target // empty | select(startswith("pol-"))' --arg g "$grp" | grep .
}
check "node1: the long pod is dispatched to a group chain that jumps to a pol- chain" within "$TIMEOUT" long_chain
LCHAIN=$(long_chain | sed -n 1p)
note "chain: $LCHAIN (${#LCHAIN} bytes)"
check "node1: that chain's name is within 255 bytes and names the namespace" \
  all "(( ${#LCHAIN} <= 255 ))" "[[ '$LCHAIN' == pol-*-at-long-nnnn* ]]"
long_peer() { local s; for s in $(rule_sets 1 "$LCHAIN" | grep -E '^sel-.*-v4$'); do has_elem 1 "$s" "$N2.50" && return 0; done; return 1; }
check "node1: its peer set holds the long-labelled client $N2.50" within "$TIMEOUT" long_peer
for i in 1 2; do
  check "node$i: every name in table weft <= 255 bytes, every comment <= 128 bytes" all \
    "nftj $i | jq -e '[.nftables[] | .[] | objects | select(.table? == \"weft\")] | (map(.name // \"\" | utf8bytelength) | max) <= 255 and (map(.comment // \"\" | utf8bytelength) | max) <= 128' >/dev/null"
  check "node$i: nft list ruleset (text) works and nft -c accepts it back" all \
    "ip netns exec $(nsof "$i") nft list ruleset >'$DIR/ruleset$i.nft'" \
    "ip netns exec $(nsof "$i") nft -c -f '$DIR/ruleset$i.nft'"
  check "node$i: nft -j list ruleset parses with jq" all "nftj $i | jq -e .nftables >/dev/null"
  check "node$i: agent still ready, no reconcile error" all "ready $i" "(( \$(metric $i weft_reconcile_errors_total) == 0 ))"
done

# ================================================================================================
section 4 "faults on node1's API connection, on the API server, in the agent's own code"
fault_pod() { mkpod at-a "$1" node1 "$2" '{"role":"client"}'; }  # NAME IP -> rv (a client pod on node1)
on1() { has_elem 1 pods-local-v4 "$1"; }                           # node1 knows it (via the proxy)
on2() { set_has 2 at-a/web-in "at-a/web-in ingress[0]" sel "$1"; } # node2 knows it (direct)

# (a) connection cut: every connection closed, new ones refused while the fault lasts
E0=$(metric 1 weft_watch_errors_total)
proxy block >/dev/null && proxy cut >"$DIR/proxy-cut.json"
check "(a) proxy cut the agent's connections ($(jq -r .cut "$DIR/proxy-cut.json" 2>/dev/null) cut) and refuses new ones" \
  all "jq -e '.cut > 0 and .open == 0 and .mode == \"block\"' '$DIR/proxy-cut.json' >/dev/null"
RV=$(fault_pod fault-a "$N1.61")
check "(a) a change during the fault reaches node2 (direct)" within "$TIMEOUT" on2 "$N1.61"
check "(a) ... but not node1 while its connection is cut (3 s)" stays_false 3 on1 "$N1.61"
check "(a) node1 counts watch errors" within "$TIMEOUT" all "(( \$(metric 1 weft_watch_errors_total) > $E0 ))"
note "(a) weft_watch_errors_total $E0 -> $(metric 1 weft_watch_errors_total); /debug/state down_seconds: $(state 1 | jq -c '[.kinds[].down_seconds]')"
t=$SECONDS; proxy forward >/dev/null
check "(a) after the cut: the change reaches node1's kernel" within "$TIMEOUT" on1 "$N1.61"
note "(a) reached node1 $((SECONDS - t)) s after the proxy forwarded again (watch retry backoff)"
check "(a) node1 applied_resource_version[pods] >= $RV" within "$TIMEOUT" applied_ge 1 pods "$RV"
check "(a) node1 ready" within "$TIMEOUT" ready 1

# (b) stalled stream: nothing forwarded, nothing closed, for longer than the stall timeout
S0=$(metric 1 weft_watch_restarts_total 'reason="stall"')
proxy stall >/dev/null
t=$SECONDS
RV=$(fault_pod fault-b "$N1.62")
check "(b) a change during the stall reaches node2" within "$TIMEOUT" on2 "$N1.62"
check "(b) ... but not node1 while its streams are stalled (5 s)" stays_false 5 on1 "$N1.62"
stalled_all() {
  local k
  for k in pods namespaces networkpolicies nodes; do
    (( $(metric 1 weft_watch_restarts_total "kind=\"$k\"" 'reason="stall"') >= 1 )) || return 1
  done
  (( $(metric 1 weft_watch_restarts_total 'reason="stall"') >= S0 + 4 ))
}
check "(b) all four watches restarted with reason=stall (--stall-timeout $STALL) within $((STALL + 40)) s" within $((STALL + 40)) stalled_all
note "(b) after $((SECONDS - t)) s: $(metrics 1 | grep 'reason="stall"' | tr '\n' ' ')"
check "(b) /debug/state counts a restart on every kind" all "state 1 | jq -e '[.kinds[].restarts] | min >= 1' >/dev/null"
check "(b) the change has not reached node1 while stalled" all "! on1 $N1.62"
t=$SECONDS; proxy forward >/dev/null
check "(b) after the stall: the change reaches node1's kernel" within "$TIMEOUT" on1 "$N1.62"
note "(b) reached node1 $((SECONDS - t)) s after the proxy forwarded again"
check "(b) node1 applied_resource_version[pods] >= $RV" within "$TIMEOUT" applied_ge 1 pods "$RV"
check "(b) node1 ready" within "$TIMEOUT" ready 1

# (c) 410 Gone. Compaction alone gives none: watches are served from the API server's watch
# cache, which still holds the old resourceVersions (shown first, as a note). Compaction past
# the agent's resourceVersion plus an API server restart (its cache restarts at the current
# revision) does: the agent's re-watch from its old resourceVersion gets 410 and relists.
L0=$(metric 1 weft_watch_relists_total)
proxy block >/dev/null && proxy cut >/dev/null
fault_pod fault-c0 "$N1.63" >/dev/null
REV=$(etcd_rev); etcd /v3/kv/compaction "{\"revision\":\"$REV\",\"physical\":true}" >/dev/null
proxy forward >/dev/null
within "$TIMEOUT" on1 "$N1.63"
note "(c) compaction alone (to revision $REV, no API server restart): change arrived: $(on1 "$N1.63" && echo yes || echo no), relists $L0 -> $(metric 1 weft_watch_relists_total): the watch cache served the old resourceVersion"
within "$TIMEOUT" ready 1
L0=$(metric 1 weft_watch_relists_total) L20=$(metric 2 weft_watch_relists_total)
proxy block >/dev/null && proxy cut >/dev/null
RV=$(fault_pod fault-c "$N1.64")
for n in 1 2 3; do K create configmap "compact-$n" -n at-a -o name >/dev/null; done
REV=$(etcd_rev)
check "(c) etcd compacted to revision $REV (node1's pods resourceVersion: $(applied_rv 1 pods))" \
  all "etcd /v3/kv/compaction '{\"revision\":\"$REV\",\"physical\":true}' | jq -e .header >/dev/null"
check "(c) kube-apiserver restarted (SIGTERM)" "$CLUSTER" restart "$DIR" kube-apiserver TERM
proxy forward >/dev/null
check "(c) node1 relists after 410 Gone (weft_watch_relists_total > $L0)" within "$TIMEOUT" all \
  "(( \$(metric 1 weft_watch_relists_total) > $L0 ))"
note "(c) node1: $(metrics 1 | grep '^weft_watch_relists_total' | tr '\n' ' ')"
check "(c) the change made during the fault reaches node1's kernel" within "$TIMEOUT" on1 "$N1.64"
check "(c) node1 applied_resource_version[pods] >= $RV" within "$TIMEOUT" applied_ge 1 pods "$RV"
check "(c) node1 and node2 ready" within "$TIMEOUT" all "ready 1" "ready 2"
note "(c) node2 (direct, its watches also broken by the restart): relists $L20 -> $(metric 2 weft_watch_relists_total)"
grep -h '(410)' "$DIR/logs/agent1.log" | tail -2 | sed 's/^/     agent1: /'

# (d) kube-apiserver SIGKILLed, down for a while, started again. No write can happen while it
# is down, so the change is made right after it is back, while the agents are still backing off.
E0=$(metric 1 weft_watch_errors_total) E20=$(metric 2 weft_watch_errors_total)
read -r APID _ <"$DIR/pids/kube-apiserver.pid"
kill -KILL "$APID"
check "(d) kube-apiserver (pid $APID) killed with SIGKILL" within 10 all \
  "! kill -0 $APID 2>/dev/null || [[ \$(awk '{print \$3}' /proc/$APID/stat) == Z ]]"
sleep 5
check "(d) 5 s into the outage: both agents still ready (grace), node1's kernel untouched" all \
  "ready 1" "ready 2" "on1 $N1.64" "on2 $N1.64"
check "(d) kube-apiserver started again" "$CLUSTER" restart "$DIR" kube-apiserver
RV=$(fault_pod fault-d "$N1.65")
check "(d) a change right after the restart reaches node1 (via the proxy)" within "$TIMEOUT" on1 "$N1.65"
check "(d) ... and node2" within "$TIMEOUT" on2 "$N1.65"
check "(d) both agents counted watch errors" all "(( \$(metric 1 weft_watch_errors_total) > $E0 ))" "(( \$(metric 2 weft_watch_errors_total) > $E20 ))"
note "(d) weft_watch_errors_total node1 $E0 -> $(metric 1 weft_watch_errors_total), node2 $E20 -> $(metric 2 weft_watch_errors_total)"
for i in 1 2; do
  check "(d) node$i applied_resource_version[pods] >= $RV" within "$TIMEOUT" applied_ge "$i" pods "$RV"
  check "(d) node$i ready" within "$TIMEOUT" ready "$i"
done

# (e) a panic in the policy handler, then one in the pods watch (test-only hooks), on node2
check "(e) node2 agent stopped (SIGTERM, exit 0)" stop_agent 2
start_agent 2 "$KC2" WEFT_FAULT_INJECT=panic-policy=boom
check "(e) node2 agent with WEFT_FAULT_INJECT=panic-policy=boom ready" within "$TIMEOUT" ready 2
check "(e) weft_reconcile_panics_total 0 before" all "(( \$(metric 2 weft_reconcile_panics_total) == 0 ))"
RV=$(apply_json <<'EOF'
{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"boom","namespace":"at-a"},
 "spec":{"podSelector":{"matchLabels":{"role":"client"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}}]}]}}
EOF
)
check "(e) weft_reconcile_panics_total == 1" within "$TIMEOUT" all "(( \$(metric 2 weft_reconcile_panics_total) == 1 ))"
check "(e) policy boom is enforced nevertheless: node2 has its chain" within "$TIMEOUT" has_pol_chain 2 at-a/boom
check "(e) ... and dispatches node2's client pod $CLI2" within "$TIMEOUT" map_key 2 ingress-dispatch-v4 "$CLI2"
check "(e) node2 applied_resource_version[networkpolicies] >= $RV" within "$TIMEOUT" applied_ge 2 networkpolicies "$RV"
check "(e) node2 agent alive and ready after the panic, still exactly one panic" all \
  "alive 2" "ready 2" "(( \$(metric 2 weft_reconcile_panics_total) == 1 ))"
check "(e) node1 (no fault injected) enforces boom too" within "$TIMEOUT" has_pol_chain 1 at-a/boom

check "(e) node2 agent stopped again" stop_agent 2
start_agent 2 "$KC2" WEFT_FAULT_INJECT=panic-watch=pods
check "(e) node2 agent with WEFT_FAULT_INJECT=panic-watch=pods ready" within "$TIMEOUT" ready 2
RV=$(mkpod at-a fault-e node2 "$N2.66" '{"role":"client"}')
check "(e) weft_watch_restarts_total{kind=\"pods\",reason=\"panic\"} >= 1" within "$TIMEOUT" all \
  "(( \$(metric 2 weft_watch_restarts_total 'kind=\"pods\"' 'reason=\"panic\"') >= 1 ))"
check "(e) pods still flow: the pod written around the panic reaches node2's kernel" within "$TIMEOUT" has_elem 2 pods-local-v4 "$N2.66"
RV=$(mkpod at-a fault-e2 node2 "$N2.67" '{"role":"client"}')
check "(e) ... and the next one" within "$TIMEOUT" has_elem 2 pods-local-v4 "$N2.67"
check "(e) node2 applied_resource_version[pods] >= $RV" within "$TIMEOUT" applied_ge 2 pods "$RV"
check "(e) node2 agent alive and ready" all "alive 2" "ready 2"

# ================================================================================================
section 6 "SIGTERM leaves the table; a restarted agent adopts it with no nft op"
for i in 1 2; do
  kc=$KC1; [[ $i == 2 ]] && kc=$KC2
  within "$TIMEOUT" ready "$i"
  sleep 1
  ruleset_norm "$i" >"$DIR/before$i.json"
  check "node$i: agent exits 0 on SIGTERM" stop_agent "$i"
  sleep 2
  ruleset_norm "$i" >"$DIR/after$i.json"
  check "node$i: ruleset unchanged after SIGTERM, counters aside ($(jq '[.[] | .rule // empty] | length' "$DIR/before$i.json") rules, $(jq '[.[] | (.set // .map // empty) | .elem // [] | length] | add' "$DIR/before$i.json") elements)" \
    cmp -s "$DIR/before$i.json" "$DIR/after$i.json"
  start_agent "$i" "$kc"
  check "node$i: restarted agent ready" within "$TIMEOUT" ready "$i"
  sleep 3
  check "node$i: weft_nft_ops_total == 0 after adopting the table (is $(metric "$i" weft_nft_ops_total))" \
    all "(( \$(metric $i weft_nft_ops_total) == 0 ))"
  ruleset_norm "$i" >"$DIR/adopted$i.json"
  check "node$i: table inet weft identical after adoption (same handles: nothing rewritten)" \
    cmp -s <(weft_only "$DIR/before$i.json") <(weft_only "$DIR/adopted$i.json")
  if cmp -s "$DIR/before$i.json" "$DIR/adopted$i.json"; then
    note "node$i: the whole ruleset (every table) is identical after the restart too"
  else
    note "node$i: outside table inet weft the restart changed: $(diff <(jq -c '.[] | del(.[keys[0]].handle)' "$DIR/before$i.json") <(jq -c '.[] | del(.[keys[0]].handle)' "$DIR/adopted$i.json") >/dev/null && echo 'handles only (a table was rewritten)' || echo 'content (see DIR/before'$i'.json, adopted'$i'.json)')"
  fi
done
fault_pod after-adopt "$N1.70" >/dev/null
check "after adoption, changes flow again on node1 and node2" within "$TIMEOUT" all "on1 $N1.70" "on2 $N1.70"
check "node1: weft_nft_ops_total > 0 once something changed" all "(( \$(metric 1 weft_nft_ops_total) > 0 ))"
for i in 1 2; do
  check "node$i: no reconcile error in the last run" all "(( \$(metric $i weft_reconcile_errors_total) == 0 ))"
done
for i in 1 2; do
  check "node$i: no panic in the agent log but the injected ones" all \
    "(( \$(grep -c 'panicked at' '$DIR/logs/agent$i.log') == \$(grep -c '^injected fault' '$DIR/logs/agent$i.log') ))"
done

# ================================================================================================
echo
echo "=== summary ($((SECONDS - T_START)) s, logs in $DIR/logs)"
for r in "${RESULTS[@]}"; do
  IFS='|' read -r res sec what <<<"$r"
  printf '%-4s  %-2s %s\n' "$res" "$sec" "$what"
done
echo
echo "API write -> kernel, both nodes (node1 through the fault proxy), from just before the write until /debug/state shows it:"
printf '  %s\n' "${LATENCIES[@]}"
echo "agent-test: $PASS passed, $FAIL failed"
if ((FAIL == 0)); then
  trap - EXIT
  teardown
  ((OWN_DIR)) && rm -rf "$DIR"
  exit 0
fi
echo "agent-test: logs kept in $DIR/logs"
exit 1
