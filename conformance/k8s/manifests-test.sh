#!/usr/bin/env bash
# manifests/ against a real kube-apiserver: server-side dry run and a real apply of the
# kustomization; the RBAC is the least the agent needs (can-i checks both ways); and the
# agent, started with the DaemonSet's own args and the ConfigMap's values, under the
# ServiceAccount's token (nothing else), lists every kind and becomes ready. The mesh's cluster
# secret is the optional Secret weft-mesh mounted as a file (no env value); without the Secret
# the agent runs with the mesh off and says so, and with encryption on it refuses (exit 2).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export WEFT_NS_PREFIX=weft-mt WEFT_NODES=0
DIR=$(mktemp -d /tmp/weft-mt.XXXXXX)
WEFT=${CARGO_TARGET_DIR:-$REPO/target}/debug/weft
agent_pid=
cleanup() {
  [[ -n $agent_pid ]] && kill "$agent_pid" 2>/dev/null
  bash "$HERE/cluster.sh" down "$DIR/cluster" >/dev/null 2>&1
  rm -rf "$DIR"
}
trap cleanup EXIT
passed=0; failed=0
check() { if "$@"; then passed=$((passed + 1)); echo "ok   $*"; else failed=$((failed + 1)); echo "FAIL $*"; fi; }
kc() { bash "$HERE/cluster.sh" kubectl "$DIR/cluster" "$@"; }

bash "$HERE/cluster.sh" up "$DIR/cluster" >/dev/null 2>"$DIR/up.log" || { tail -20 "$DIR/up.log"; echo "manifests-test: 0 passed, 1 failed"; exit 1; }
# kubectl runs in the host namespace: give it the manifests through stdin (kustomize output).
kustomized() { (cd "$REPO/manifests" && cat rbac.yaml; echo ---; cat node-policy.yaml; echo ---; cat configmap.yaml; echo ---; cat daemonset.yaml); }
# Every file the kustomization lists is in what this test applies.
all_listed_applied() { diff <(sed -n 's/^- //p' "$REPO/manifests/kustomization.yaml" | sort) <(printf '%s\n' rbac.yaml node-policy.yaml configmap.yaml daemonset.yaml | sort); }
check all_listed_applied
dry_run() { kustomized | kc apply --dry-run=server -f - >/dev/null; }
check dry_run
applied() { kustomized | kc apply -f - >/dev/null && kc -n kube-system get daemonset weft >/dev/null; }
check applied
SA=system:serviceaccount:kube-system:weft
can() { [[ $(kc auth can-i "$@" --as=$SA 2>/dev/null) == yes ]]; }
cannot() { ! can "$@"; }
for v in "list pods" "watch pods" "list namespaces" "watch networkpolicies.networking.k8s.io" "list nodes" "create events" "create events.events.k8s.io" "patch nodes"; do
  check can $v
done
for v in "get secrets" "update pods" "delete networkpolicies.networking.k8s.io" "create pods" "patch nodes --subresource=status"; do
  check cannot $v
done
# What RBAC cannot narrow, the admission policy does (manifests/node-policy.yaml): as the
# agent's ServiceAccount, a Node's weft.dev/mesh-identity annotation may change and nothing
# else (refused with the policy's message, the Node unchanged); another user's changes pass.
kc create -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata: {name: mt-policy-node, labels: {kubernetes.io/hostname: mt-policy-node}, annotations: {team: infra}}
---
apiVersion: v1
kind: Node
metadata: {name: mt-policy-other}
EOF
as_sa() { kc "$@" --as=$SA >/dev/null 2>"$DIR/as_sa.err"; }
refused_by_policy() { # kubectl args... : refused by the policy with one of its messages (not an error in it)
  ! as_sa "$@" && grep -F "ValidatingAdmissionPolicy 'weft-agent-node-changes'" "$DIR/as_sa.err" >/dev/null &&
    grep -F "denied request: the weft agent may" "$DIR/as_sa.err" >/dev/null || { cat "$DIR/as_sa.err"; return 1; }
}
# The API server loads a new policy within moments: wait (server dry runs change nothing).
policy_loaded() {
  local i
  for i in $(seq 1 50); do
    refused_by_policy label node mt-policy-node probe=1 --dry-run=server >/dev/null && return 0
    sleep 0.2
  done
  return 1
}
check policy_loaded
node_json() { kc get node "$1" -o json; }
publishes_identity() {
  as_sa annotate node mt-policy-node weft.dev/mesh-identity=AAAA --overwrite || { cat "$DIR/as_sa.err"; return 1; }
  [[ $(node_json mt-policy-node | jq -r '.metadata.annotations["weft.dev/mesh-identity"]') == AAAA ]]
}
check publishes_identity
check refused_by_policy label node mt-policy-node extra=1
check refused_by_policy annotate node mt-policy-node team=other --overwrite
check refused_by_policy annotate node mt-policy-node added=1
check refused_by_policy annotate node mt-policy-node team-
check refused_by_policy patch node mt-policy-node --type=merge -p '{"spec":{"unschedulable":true}}'
check refused_by_policy patch node mt-policy-node --type=merge -p '{"metadata":{"finalizers":["example.com/hold"]}}'
node_unchanged() {
  node_json mt-policy-node | jq -e '.metadata.labels == {"kubernetes.io/hostname": "mt-policy-node"}
    and .metadata.annotations == {"team": "infra", "weft.dev/mesh-identity": "AAAA"}
    and (.spec.unschedulable // false) == false and (.metadata.finalizers // []) == []' >/dev/null
}
check node_unchanged
others_unaffected() { kc label node mt-policy-node extra=1 >/dev/null && kc label node mt-policy-node extra- >/dev/null; }
check others_unaffected
# A token bound to a Node (as kubelet's pod-bound tokens carry the node's name): that Node's
# annotation only, not another's.
KUBECTL_BIN=$(. "$DIR/cluster/state/env"; echo "$BIN_DIR/kubectl")
bound_token=$(kc -n kube-system create token weft --duration=10m --bound-object-kind=Node --bound-object-name=mt-policy-node)
as_bound() { # kubectl args... as the node-bound token
  ip netns exec weft-mt-host "$KUBECTL_BIN" --server=https://127.0.0.1:6443 \
    --certificate-authority="$DIR/cluster/pki/ca.crt" --token="$bound_token" --request-timeout=20s "$@" >/dev/null 2>"$DIR/as_bound.err"
}
own_node_only() {
  as_bound annotate node mt-policy-node weft.dev/mesh-identity=BBBB --overwrite || { cat "$DIR/as_bound.err"; return 1; }
  ! as_bound annotate node mt-policy-other weft.dev/mesh-identity=BBBB --overwrite &&
    grep -F "denied request: the weft agent may change only the Node its token was issued for" "$DIR/as_bound.err" >/dev/null || { cat "$DIR/as_bound.err"; return 1; }
  [[ $(node_json mt-policy-other | jq -r '.metadata.annotations["weft.dev/mesh-identity"] // "none"') == none ]]
}
check own_node_only
kc delete node mt-policy-node mt-policy-other >/dev/null

# The agent under the ServiceAccount's token only, with the DaemonSet's args.
token=$(kc -n kube-system create token weft --duration=10m)
cat >"$DIR/sa.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$DIR/cluster/pki/ca.crt"}}]
users: [{name: weft, user: {token: "$token"}}]
contexts: [{name: c, context: {cluster: c, user: weft}}]
current-context: c
KC
kc -n kube-system get daemonset weft -o json >"$DIR/daemonset.json"
# The cluster secret: a secret volume of the optional Secret weft-mesh, 0400, mounted read-only
# where the agent's --mesh-secret-file points; never an env value.
secret_volume() {
  jq -e '.spec.template.spec as $s | ($s.containers[] | select(.name == "agent")) as $c
    | ($s.volumes[] | select(.secret.secretName == "weft-mesh")) as $v
    | $v.secret.optional == true and $v.secret.defaultMode == 256
    and ([$c.volumeMounts[] | select(.name == $v.name and .readOnly == true) | .mountPath] as $m
      | $m | length == 1 and ($c.args | any(startswith("--mesh-secret-file=" + $m[0] + "/"))))' \
    "$DIR/daemonset.json" >/dev/null
}
check secret_volume
no_secret_env() { jq -e '[.spec.template.spec.containers[] | .env[]? | select(.name == "WEFT_MESH_SECRET" or .valueFrom.secretKeyRef)] | length == 0' "$DIR/daemonset.json" >/dev/null; }
check no_secret_env
mapfile -t args < <(jq -r '.spec.template.spec.containers[0].args[]' "$DIR/daemonset.json")
declare -A cm
while IFS='=' read -r k v; do cm[$k]=$v; done < <(kc -n kube-system get configmap weft-config -o json | jq -r '.data | to_entries[] | "\(.key)=\(.value)"')
final=() SECRET_FILE=$DIR/mesh/secret
for a in "${args[@]}"; do
  for k in "${!cm[@]}"; do a=${a//\$($k)/${cm[$k]}}; done
  case $a in
    --socket=*) a="--socket=$DIR/agent.sock" ;;           # the host path is the node's, not ours
    --metrics-addr=*) a="--metrics-addr=127.0.0.1:16784" ;;
    --state-dir=*) a="--state-dir=$DIR/state" ;;
    # The volume's directory on this "node": empty, as the kubelet leaves it without the Secret.
    --mesh-secret-file=*) mkdir -p "$DIR/mesh"; a="--mesh-secret-file=$DIR/mesh/${a##*/}"; SECRET_FILE=${a#*=} ;;
  esac
  final+=("$a")
done
echo "agent args from the DaemonSet: ${final[*]}"
args_resolved() { ! grep -q '\$(' <<<"${final[*]}"; }
check args_resolved
no_secret_in_api() { [[ -z $(kc -n kube-system get secret weft-mesh --ignore-not-found -o name) ]]; }
check no_secret_in_api
ip netns exec weft-mt-host env WEFT_NODE_NAME=mt-node KUBECONFIG="$DIR/sa.kubeconfig" \
  "$WEFT" "${final[@]}" --dry-run >"$DIR/agent.log" 2>&1 &
agent_pid=$!
ready() {
  local deadline=$((SECONDS + 60))
  until ip netns exec weft-mt-host curl -sf http://127.0.0.1:16784/readyz >/dev/null; do
    ((SECONDS < deadline)) || { tail -20 "$DIR/agent.log"; return 1; }
    kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$DIR/agent.log"; return 1; }
    sleep 0.5
  done
}
check ready
no_forbidden() { ! grep -qi forbidden "$DIR/agent.log"; }
check no_forbidden
# No Secret: the mesh is off (/debug/mesh: 404 "mesh off"), one warning naming the file and
# how to create the Secret.
mesh_off_warned() {
  [[ $(grep -cF "mesh off: the cluster secret file $SECRET_FILE does not exist" "$DIR/agent.log") == 1 ]] &&
    grep -qF "kubectl -n kube-system create secret generic weft-mesh" "$DIR/agent.log" &&
    ip netns exec weft-mt-host curl -s http://127.0.0.1:16784/debug/mesh | grep "mesh off" >/dev/null ||
    { grep -i mesh "$DIR/agent.log"; ip netns exec weft-mt-host curl -s http://127.0.0.1:16784/debug/mesh; return 1; }
}
check mesh_off_warned
# With encryption on it needs the mesh: refused at start, exit 2, one line saying what to do.
refuses() { # on|off expected-words... (the agent's one stderr line has them all)
  local rc w encryption=$1; shift
  ip netns exec weft-mt-host env WEFT_NODE_NAME=mt-node KUBECONFIG="$DIR/sa.kubeconfig" WEFT_ENCRYPTION="$encryption" \
    timeout 20 "$WEFT" "${final[@]}" --dry-run --metrics-addr=127.0.0.1:16785 --socket="$DIR/agent2.sock" \
    >"$DIR/refused.out" 2>"$DIR/refused.err"
  rc=$?
  [[ $rc == 2 ]] || { echo "exit $rc"; cat "$DIR/refused.err"; return 1; }
  [[ $(wc -l <"$DIR/refused.err") == 1 ]] || { cat "$DIR/refused.err"; return 1; }
  for w in "$@"; do grep -qF -- "$w" "$DIR/refused.err" || { cat "$DIR/refused.err"; return 1; }; done
}
check refuses on "$SECRET_FILE does not exist" "kubectl -n kube-system create secret generic weft-mesh"
# An empty secret (the Secret created with nothing in its key): refused, encryption on or off.
: >"$SECRET_FILE"
check refuses off "$SECRET_FILE" "empty"
rm -f "$SECRET_FILE"
echo "manifests-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
