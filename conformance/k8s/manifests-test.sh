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
kustomized() { (cd "$REPO/manifests" && cat rbac.yaml; echo ---; cat configmap.yaml; echo ---; cat daemonset.yaml); }
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
