#!/usr/bin/env bash
# Smoke test of the test control plane: build (or reuse) the binaries, bring a
# cluster up with 2 node namespaces, check what later tests rely on, tear down.
#
#   conformance/k8s/smoke-test.sh [DIR]     (default: a fresh temp dir)
#
# Env: WEFT_NS_PREFIX (default weft-smoke, so it does not collide with a `weft`
# cluster someone is using), WEFT_CHECK_TIMEOUT (default 60 s per wait).
# Exits non-zero if any check fails; always tears the cluster down.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER="$HERE/cluster.sh"
export WEFT_NS_PREFIX=${WEFT_NS_PREFIX:-weft-smoke}
export WEFT_NODES=2
TIMEOUT=${WEFT_CHECK_TIMEOUT:-60}
OWN_DIR=0
if [[ -n "${1:-}" ]]; then DIR=$1; else DIR=$(mktemp -d /tmp/weft-k8s-smoke.XXXXXX); OWN_DIR=1; fi

PASS=0 FAIL=0
ok()  { PASS=$((PASS + 1)); printf 'ok   - %s\n' "$*"; }
bad() { FAIL=$((FAIL + 1)); printf 'FAIL - %s\n' "$*"; }
check() { # description cmd...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
summary() { echo "smoke-test: $PASS passed, $FAIL failed"; }
# retry cmd until it succeeds, at most TIMEOUT seconds
eventually() {
  local deadline=$((SECONDS + TIMEOUT))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

for t in jq ip curl openssl; do
  command -v "$t" >/dev/null || { echo "smoke-test: $t is required" >&2; exit 1; }
done

BIN_DIR=$("$HERE/install.sh") || { echo "smoke-test: install.sh failed" >&2; exit 1; }
export WEFT_BIN_DIR=$BIN_DIR

teardown() {
  "$CLUSTER" down "$DIR" >/dev/null 2>&1 || true
}
trap 'rc=$?; teardown; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

HOST_NS="$WEFT_NS_PREFIX-host"
K() { "$CLUSTER" kubectl "$DIR" "$@"; }                     # admin, from the host netns
KN() { local n=$1; shift                                     # node identity, from node netns
  ip netns exec "$WEFT_NS_PREFIX-$n" "$BIN_DIR/kubectl" \
    --kubeconfig "$DIR/kubeconfig/$n.kubeconfig" --request-timeout=20s "$@"; }

# --- 0. binaries -------------------------------------------------------------------
check "kube-proxy --version works" bash -c "[[ \"\$('$BIN_DIR/kube-proxy' --version)\" == Kubernetes\ v* ]]"
check "kube-apiserver and kube-controller-manager report the same version" bash -c \
  "[[ \"\$('$BIN_DIR/kube-apiserver' --version)\" == \"\$('$BIN_DIR/kube-controller-manager' --version)\" ]]"

# --- 1. up ---------------------------------------------------------------------------
if ! "$CLUSTER" up "$DIR"; then
  bad "cluster.sh up $DIR"
  summary
  exit 1
fi
ok "cluster.sh up (WEFT_NODES=2)"
check "cluster.sh status reports everything alive and ready" "$CLUSTER" status "$DIR"

# --- 2. underlay + identities ---------------------------------------------------------
check "node1 has 198.18.0.11 on eth0" bash -c "ip -n $WEFT_NS_PREFIX-node1 -4 addr show eth0 | grep 'inet 198.18.0.11/24' >/dev/null"
check "node2 has 198.18.0.12 on eth0" bash -c "ip -n $WEFT_NS_PREFIX-node2 -4 addr show eth0 | grep 'inet 198.18.0.12/24' >/dev/null"
check "node1 reaches the apiserver at https://198.18.0.1:6443 as weft agent" \
  bash -c "[[ \"\$(ip netns exec $WEFT_NS_PREFIX-node1 '$BIN_DIR/kubectl' --kubeconfig '$DIR/kubeconfig/node1.kubeconfig' get --raw /readyz)\" == ok ]]"
check "node2 can list networkpolicies (RBAC weft-agent)" KN node2 get networkpolicies -A
check "node2 can watch pods" bash -c "[[ \"\$(ip netns exec $WEFT_NS_PREFIX-node2 '$BIN_DIR/kubectl' --kubeconfig '$DIR/kubeconfig/node2.kubeconfig' auth can-i watch pods --all-namespaces)\" == yes ]]"
check "node1 can create events.k8s.io events" bash -c "[[ \"\$(ip netns exec $WEFT_NS_PREFIX-node1 '$BIN_DIR/kubectl' --kubeconfig '$DIR/kubeconfig/node1.kubeconfig' auth can-i create events.events.k8s.io -n default)\" == yes ]]"
check "node1 cannot read secrets" bash -c "[[ \"\$(ip netns exec $WEFT_NS_PREFIX-node1 '$BIN_DIR/kubectl' --kubeconfig '$DIR/kubeconfig/node1.kubeconfig' auth can-i list secrets -n default)\" == no ]]"
check "kube-proxy identity may list endpointslices (system:node-proxier)" bash -c \
  "[[ \"\$(ip netns exec $HOST_NS '$BIN_DIR/kubectl' --kubeconfig '$DIR/kubeconfig/kube-proxy.kubeconfig' auth can-i list endpointslices.discovery.k8s.io -A)\" == yes ]]"

# --- 3. Node gets podCIDRs from the controller-manager (both families) ----------------
K create -f - >/dev/null <<'EOF'
{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "labels": {"weft.test/smoke": "yes"}}}
EOF
check "created Node node1" K get node node1 -o name
podcidrs() { K get node node1 -o jsonpath='{.spec.podCIDRs}' 2>/dev/null; }
two_cidrs() { [[ "$(podcidrs | jq 'length' 2>/dev/null)" == 2 ]]; }
check "node1 gets two podCIDRs within ${TIMEOUT}s" eventually two_cidrs
CIDRS=$(podcidrs); CIDRS=${CIDRS:-[]}
echo "     node1 podCIDRs: $CIDRS"
check "node1 IPv4 podCIDR is a /24 inside 10.244.0.0/16" \
  bash -c "jq -e 'map(select(test(\"^10\\\\.244\\\\.[0-9]+\\\\.0/24$\"))) | length == 1' <<<'$CIDRS' >/dev/null"
check "node1 IPv6 podCIDR is a /64 inside fd00:10:244::/48" \
  bash -c "jq -e 'map(select(test(\"^fd00:10:244:(:|[0-9a-f]{1,4}::)/64$\"))) | length == 1' <<<'$CIDRS' >/dev/null"
check "node1 .spec.podCIDR equals the first of .spec.podCIDRs" \
  bash -c "[[ \"\$('$CLUSTER' kubectl '$DIR' get node node1 -o jsonpath='{.spec.podCIDR}')\" == \"\$(jq -r '.[0]' <<<'$CIDRS')\" ]]"

# --- 4. Namespace gets its default ServiceAccount -------------------------------------
K create namespace smoke >/dev/null
check "created namespace smoke" K get namespace smoke -o name
sa_ok() { K get serviceaccount default -n smoke -o name >/dev/null 2>&1; }
check "ServiceAccount smoke/default appears within ${TIMEOUT}s" eventually sa_ok
ca_ok() { K get configmap kube-root-ca.crt -n smoke -o name >/dev/null 2>&1; }
check "ConfigMap smoke/kube-root-ca.crt appears within ${TIMEOUT}s" eventually ca_ok

# --- 5. NetworkPolicy with endPort and a named port reads back unchanged --------------
cat >"$DIR/smoke-netpol.json" <<'EOF'
{
  "apiVersion": "networking.k8s.io/v1",
  "kind": "NetworkPolicy",
  "metadata": {"name": "smoke", "namespace": "smoke"},
  "spec": {
    "podSelector": {"matchLabels": {"app": "web"}},
    "policyTypes": ["Ingress", "Egress"],
    "ingress": [{
      "from": [
        {"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["client", "probe"]}]}},
        {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {}},
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}
      ],
      "ports": [
        {"protocol": "TCP", "port": 8000, "endPort": 8100},
        {"protocol": "TCP", "port": "http"},
        {"protocol": "UDP", "port": "dns"},
        {"protocol": "SCTP", "port": 9000}
      ]
    }],
    "egress": [{
      "to": [{"ipBlock": {"cidr": "fd00:10:244::/48"}}],
      "ports": [{"protocol": "UDP", "port": 30000, "endPort": 32767}]
    }]
  }
}
EOF
check "created NetworkPolicy smoke/smoke" K create -f "$DIR/smoke-netpol.json" -o name
GOT=$(K get networkpolicy smoke -n smoke -o json | jq -S .spec)
WANT=$(jq -S .spec "$DIR/smoke-netpol.json")
if [[ -n "$GOT" && "$GOT" == "$WANT" ]]; then
  ok "NetworkPolicy spec reads back unchanged (endPort, named ports, ipBlock except, SCTP)"
else
  bad "NetworkPolicy spec reads back unchanged"
  diff <(echo "$WANT") <(echo "$GOT") | sed 's/^/     /'
fi

# --- 6. Services: dual-stack ClusterIPs, kubernetes endpoints on the underlay ---------
check "Service default/kubernetes has ClusterIP 10.96.0.1" \
  bash -c "[[ \"\$('$CLUSTER' kubectl '$DIR' get service kubernetes -n default -o jsonpath='{.spec.clusterIP}')\" == 10.96.0.1 ]]"
ep_ok() { [[ "$(K get endpointslice -n default -l kubernetes.io/service-name=kubernetes -o jsonpath='{.items[*].endpoints[*].addresses[*]}' 2>/dev/null)" == 198.18.0.1 ]]; }
check "EndpointSlice of default/kubernetes points at 198.18.0.1" eventually ep_ok
K create -f - >/dev/null <<'EOF'
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ds", "namespace": "smoke"},
 "spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
          "selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}}
EOF
IPS=$(K get service ds -n smoke -o jsonpath='{.spec.clusterIPs}'); IPS=${IPS:-[]}
echo "     smoke/ds clusterIPs: $IPS"
check "dual-stack Service gets an IPv4 ClusterIP in 10.96.0.0/16" \
  bash -c "jq -e '.[0] | test(\"^10\\\\.96\\\\.\")' <<<'$IPS' >/dev/null"
check "dual-stack Service gets an IPv6 ClusterIP in fd00:10:96::/112" \
  bash -c "jq -e '.[1] | test(\"^fd00:10:96::[0-9a-f]{1,4}$\")' <<<'$IPS' >/dev/null"

# --- 7. down: processes gone, namespaces gone, idempotent ------------------------------
PIDS=$(cat "$DIR"/pids/*.pid 2>/dev/null | awk '{print $1}')
check "cluster.sh down" "$CLUSTER" down "$DIR"
check "cluster.sh down again (idempotent)" "$CLUSTER" down "$DIR"
left=$(ip netns list | awk '{print $1}' | grep -E "^$WEFT_NS_PREFIX-(host|node[0-9]+)$" || true)
check "no namespace of ours left (ip netns list: $(ip netns list | awk '{print $1}' | tr '\n' ' '))" test -z "$left"
alive=""
for p in $PIDS; do   # a zombie (exited, not yet reaped by pid 1) counts as gone
  st=$(awk '{sub(/^.*\) /, ""); print $1}' "/proc/$p/stat" 2>/dev/null || true)
  [[ -n "$st" && "$st" != Z ]] && alive+=" $p($(cat "/proc/$p/comm" 2>/dev/null))"
done
check "no control-plane process left${alive:+ (alive:$alive)}" test -z "$alive"

summary
if ((FAIL == 0)); then
  ((OWN_DIR)) && rm -rf "$DIR"   # keep a temp DIR (logs) only when something failed
  exit 0
fi
echo "smoke-test: logs kept in $DIR/logs"
exit 1
