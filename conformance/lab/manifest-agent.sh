#!/usr/bin/env bash
# Runs one node's weft agent the way the DaemonSet in manifests/ says, so that in the lab the
# manifest is what runs: its container's command and args, its env and envFrom (the ConfigMap),
# the `$(VAR)` expansion of args, its capability set, its volumes. No kubelet runs here; this
# script plays the kubelet and the container runtime for the `agent` container:
#
#   manifest-agent.sh prepare DIR KUBECTL...   once per lab: the DaemonSet and ConfigMap as the
#                                              API server returns them (server-side dry run of
#                                              manifests/daemonset.yaml; RBAC + ConfigMap applied
#                                              for real), and a ServiceAccount token for `weft`
#   manifest-agent.sh run DIR NODE_NAME NODE_DIR APISERVER_HOST:PORT [EXTRA_AGENT_ARGS...]
#                                              in the node's network namespace: exec's the agent
#                                              (same pid: kill it like the container's process)
#
# What `run` does, step by step (each from the DaemonSet, none hard-coded here):
#   1. a private mount namespace (propagation slave: mounts of the host, such as new pod
#      netns files under /var/run/netns, still appear: HostToContainer);
#   2. every hostPath volume the container mounts is bound at its mountPath. The node's "host"
#      paths are per node in the lab (three nodes share one machine): /var/lib/weft and
#      /run/weft -> NODE_DIR (where the lab's CNI calls find the socket and release records),
#      /etc/cni/net.d -> NODE_DIR/net.d, /opt/cni/bin -> NODE_DIR/cni-bin (filled by running
#      the manifest's install-cni initContainer command), the rest (/var/run/netns,
#      /dev/net/tun) the machine's own;
#   3. the image's binaries at their image paths (/usr/local/bin/weft, weft-cni) on a tmpfs;
#   4. the ServiceAccount token, CA and namespace at /var/run/secrets/kubernetes.io/
#      serviceaccount, and KUBERNETES_SERVICE_HOST/PORT set to the API server's address (a
#      hostNetwork agent cannot rely on the Service VIP before kube-proxy runs; real CNIs
#      override these the same way), so the agent uses in-cluster config: the ServiceAccount's
#      RBAC is what it gets, nothing more;
#   5. a clean environment: only the container's env (fieldRef spec.nodeName -> NODE_NAME,
#      status.hostIP -> the node's address) and envFrom ConfigMap keys;
#   6. the capability set: privileged -> all; else exactly `capabilities.add` (minus `drop`),
#      as the bounding, inheritable and ambient sets (a root process then holds just those):
#      stricter than a container runtime, which adds its default set;
#   7. exec command + args (with `$(VAR)` expanded from that env) + EXTRA_AGENT_ARGS (the lab's
#      test knobs, e.g. a short stall timeout; printed so nothing is hidden).
#
# Mount points the kubelet would create for the agent (/run/weft, /var/lib/weft,
# /var/run/secrets/...) are made on the machine if missing (empty directories); the init
# container's (/host/...) exist only in its own overlay.
#
# Env for `run`: WEFT_IMAGE_BIN (directory holding the built weft and weft-cni; required).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
die() { echo "manifest-agent: $*" >&2; exit 1; }

cmd_prepare() { # DIR KUBECTL...
  local dir=$1; shift
  local m=$dir/manifest
  mkdir -p "$m/sa"
  "$@" apply -f "$REPO/manifests/rbac.yaml" -f "$REPO/manifests/configmap.yaml" >/dev/null
  # As the API server stores it (defaults filled in), without creating pods nobody would run.
  "$@" apply --dry-run=server -f "$REPO/manifests/daemonset.yaml" -o json >"$m/daemonset.json"
  "$@" -n kube-system get configmap weft-config -o json >"$m/configmap.json"
  "$@" -n kube-system create token weft --duration=48h >"$m/sa/token"
  printf kube-system >"$m/sa/namespace"
  chmod 600 "$m/sa/token"
}

container() { jq -c '.spec.template.spec.containers[] | select(.name == "agent")' "$M/daemonset.json"; }

cmd_run() { # DIR NODE_NAME NODE_DIR APISERVER_HOST:PORT [EXTRA...]
  DIR=$1 NODE=$2 NODE_DIR=$3 API=$4; shift 4
  M=$DIR/manifest
  [[ -s $M/daemonset.json ]] || die "no $M/daemonset.json: run 'prepare' first"
  [[ -x ${WEFT_IMAGE_BIN:-}/weft && -x $WEFT_IMAGE_BIN/weft-cni ]] || die "WEFT_IMAGE_BIN must hold weft and weft-cni"
  # 1. Our own mount namespace; everything below happens inside it, then exec's the agent.
  exec unshare --mount --propagation slave bash "$0" inside "$DIR" "$NODE" "$NODE_DIR" "$API" "$@"
}

cmd_inside() {
  DIR=$1 NODE=$2 NODE_DIR=$3 API=$4; shift 4
  M=$DIR/manifest
  local c spec host_ip
  c=$(container)
  spec=$(jq -c '.spec.template.spec' "$M/daemonset.json")
  host_ip=$(ip -j -4 addr show scope global | jq -r '[.[].addr_info[]?.local][0] // empty')
  mkdir -p "$NODE_DIR/net.d" "$NODE_DIR/cni-bin"

  # 3. The image: its binaries at the paths the manifest names.
  mount -t tmpfs -o size=1m,mode=0755 weft-image /usr/local/bin
  local b
  for b in weft weft-cni; do
    : >"/usr/local/bin/$b"
    mount --bind "$WEFT_IMAGE_BIN/$b" "/usr/local/bin/$b"
  done

  # 2. hostPath volumes at their mount paths.
  host_path() { # the lab's per-node stand-in for a node's host path
    case $1 in
      /var/lib/weft | /run/weft) echo "$NODE_DIR" ;;
      /etc/cni/net.d) echo "$NODE_DIR/net.d" ;;
      /opt/cni/bin) echo "$NODE_DIR/cni-bin" ;;
      *) echo "$1" ;;
    esac
  }
  mount_volumes() { # container-JSON [root]
    local name mpath hpath src root=${2:-}
    while IFS=$'\t' read -r name mpath; do
      hpath=$(jq -r --arg n "$name" '.volumes[] | select(.name == $n) | .hostPath.path // empty' <<<"$spec")
      [[ -n $hpath ]] || die "volume $name is not a hostPath: the lab cannot provide it"
      src=$(host_path "$hpath")
      [[ -e $src ]] || die "volume $name: $src does not exist"
      # The machine's own path at the same place: already visible (slave propagation).
      [[ -z $root && $src == "$mpath" ]] && continue
      mpath=$root$mpath
      [[ -e $mpath ]] || { if [[ -d $src ]]; then mkdir -p "$mpath"; else mkdir -p "$(dirname "$mpath")"; : >"$mpath"; fi; }
      mount --bind "$src" "$mpath"
    done < <(jq -r '.volumeMounts[]? | [.name, .mountPath] | @tsv' <<<"$1")
  }
  # The initContainers (install-cni), as the kubelet runs them first: their command with their
  # mounts, chrooted into an overlay of the machine's root whose writable layer is a tmpfs, so
  # mount points such as /host/opt/cni/bin exist only there.
  local init root
  while read -r init; do
    [[ -n $init ]] || continue
    root=$(mktemp -d /tmp/weft-init.XXXXXX)
    mount -t tmpfs -o size=4m weft-init "$root"
    mkdir "$root/upper" "$root/work" "$root/merged"
    mount -t overlay weft-init -o "lowerdir=/,upperdir=$root/upper,workdir=$root/work" "$root/merged"
    for b in weft weft-cni; do : >"$root/merged/usr/local/bin/$b"; mount --bind "/usr/local/bin/$b" "$root/merged/usr/local/bin/$b"; done
    mount_volumes "$init" "$root/merged"
    mapfile -t argv < <(jq -r '(.command // []) + (.args // []) | .[]' <<<"$init")
    chroot "$root/merged" "${argv[@]}" || die "initContainer $(jq -r .name <<<"$init") failed"
    umount -R "$root"
    rmdir "$root"
  done < <(jq -c '.initContainers[]?' <<<"$spec")
  mount_volumes "$c"

  # 4. In-cluster API access: the ServiceAccount's token, nothing else.
  local sa=/var/run/secrets/kubernetes.io/serviceaccount
  mkdir -p "$sa"
  mount -t tmpfs -o size=1m,mode=0755 weft-sa "$sa"
  cp "$M/sa/token" "$M/sa/namespace" "$sa/"
  cp "$DIR/cluster/pki/ca.crt" "$sa/ca.crt"

  # 5. The container's environment, in order (later entries may use earlier ones).
  local -a envs=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "HOME=/nonexistent"
    "KUBERNETES_SERVICE_HOST=${API%:*}" "KUBERNETES_SERVICE_PORT=${API##*:}")
  declare -A env=()
  local k v
  while IFS=$'\t' read -r k v; do env[$k]=$v; envs+=("$k=$v"); done < <(
    jq -r --slurpfile cm "$M/configmap.json" '.envFrom[]? | select(.configMapRef) |
      ($cm[0].data // {}) | to_entries[] | [.key, .value] | @tsv' <<<"$c")
  while IFS=$'\t' read -r k v; do
    case $v in
      field:spec.nodeName) v=$NODE ;;
      field:status.hostIP) v=$host_ip ;;
      field:*) die "env $k: fieldRef ${v#field:} is not provided by the lab" ;;
    esac
    env[$k]=$v; envs+=("$k=$v")
  done < <(jq -r '.env[]? | [.name, (if .valueFrom.fieldRef then "field:" + .valueFrom.fieldRef.fieldPath else (.value // "") end)] | @tsv' <<<"$c")

  # 7. command + args, `$(VAR)` expanded from the env above (Kubernetes' rule: unknown stays).
  local -a argv=()
  local a
  while IFS= read -r a; do
    for k in "${!env[@]}"; do a=${a//\$($k)/${env[$k]}}; done
    argv+=("$a")
  done < <(jq -r '(.command // []) + (.args // []) | .[]' <<<"$c")
  [[ ${#argv[@]} -gt 0 ]] || die "the agent container has no command"

  # 6. The capability set.
  local caps
  if [[ $(jq -r '.securityContext.privileged // false' <<<"$c") == true ]]; then
    caps=+all
  else
    caps=$(jq -r '[(.securityContext.capabilities.add // [])[] | ascii_downcase | "+" + .] | join(",")' <<<"$c")
    local drop
    drop=$(jq -r '[(.securityContext.capabilities.drop // [])[] | ascii_downcase | "-" + .] | join(",")' <<<"$c")
    caps="-all${caps:+,$caps}${drop:+,$drop}"
  fi
  echo "manifest-agent: node $NODE: ${argv[*]} $* (capabilities ${caps})" >&2
  exec env -i "${envs[@]}" setpriv --bounding-set "$caps" --inh-caps "$caps" --ambient-caps "$caps" -- "${argv[@]}" "$@"
}

case ${1:-} in
  prepare) shift; cmd_prepare "$@" ;;
  run) shift; cmd_run "$@" ;;
  inside) shift; cmd_inside "$@" ;;
  *) die "usage: manifest-agent.sh prepare DIR KUBECTL... | run DIR NODE NODE_DIR API [ARGS...]" ;;
esac
