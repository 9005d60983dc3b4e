#!/usr/bin/env bash
# Runs one node's weft agent the way the DaemonSet in manifests/ says, so that in the lab the
# manifest is what runs: its container's command and args, its env and envFrom (the ConfigMap),
# the `$(VAR)` expansion of args, its capability set, its volumes. No kubelet runs here; this
# script plays the kubelet and the container runtime for the `agent` container:
#
#   manifest-agent.sh prepare DIR KUBECTL...   once per lab: the DaemonSet and ConfigMap as the
#                                              API server returns them (server-side dry run of
#                                              manifests/daemonset.yaml; RBAC, the Node admission
#                                              policy and the ConfigMap applied
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
#      every secret volume as the kubelet makes it: the Secret read from the API at each start
#      (with the lab's admin kubectl that `prepare` recorded; a kubelet uses its node identity),
#      each key (or the `items` chosen) a file with defaultMode (or the item's mode) in
#      NODE_DIR.kubelet/<volume> (NODE_DIR.kubelet is 0700; the kubelet's layout: the files
#      are links into ..data, a link to the current copy), bound read-only at its mountPath;
#      `optional: true` and no Secret: an empty directory; a missing Secret that is not
#      optional: an error, the agent does not start. The API unreachable at a restart: the
#      copy of the last start is kept (a kubelet keeps the pod's volume), if there is one;
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
# Mount points the kubelet would create for the agent (/run/weft, /var/lib/weft, /etc/weft/mesh,
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
  "$@" apply -f "$REPO/manifests/rbac.yaml" -f "$REPO/manifests/node-policy.yaml" -f "$REPO/manifests/configmap.yaml" >/dev/null
  # As the API server stores it (defaults filled in), without creating pods nobody would run.
  "$@" apply --dry-run=server -f "$REPO/manifests/daemonset.yaml" -o json >"$m/daemonset.json"
  "$@" -n kube-system get configmap weft-config -o json >"$m/configmap.json"
  "$@" -n kube-system create token weft --duration=48h >"$m/sa/token"
  printf kube-system >"$m/sa/namespace"
  chmod 600 "$m/sa/token"
  # The kubelet's API access, for secret volumes at `run`.
  printf '%q ' "$@" >"$m/kubectl"
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
  POD_NS=$(jq -r '.metadata.namespace // "default"' "$M/daemonset.json")
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
  # A secret volume's files, as the kubelet writes them, in VOLUME_DIR (the directory to bind).
  secret_volume() { # volume-JSON
    local vol=$1 name sname optional dir secret files key path mode
    name=$(jq -r .name <<<"$vol")
    sname=$(jq -r .secret.secretName <<<"$vol")
    optional=$(jq -r '.secret.optional // false' <<<"$vol")
    dir=${NODE_DIR%/}.kubelet/$name
    VOLUME_DIR=$dir
    mkdir -p "$dir"
    chmod 0700 "$(dirname "$dir")"
    chmod 0755 "$dir"
    [[ -s $M/kubectl ]] || die "volume $name: no $M/kubectl: run 'prepare' again"
    local -a kubectl
    eval "kubectl=($(cat "$M/kubectl"))"
    if ! secret=$("${kubectl[@]}" -n "$POD_NS" get secret "$sname" -o json --ignore-not-found </dev/null); then
      [[ -L $dir/..data ]] || die "volume $name: cannot read the Secret $POD_NS/$sname from the API (and no earlier copy)"
      echo "manifest-agent: volume $name: the API does not answer; the copy of the last start stays" >&2
      return 0
    fi
    if [[ -z $secret ]]; then
      [[ $optional == true ]] || die "volume $name: the Secret $POD_NS/$sname does not exist and the volume is not optional (a kubelet would not start the pod)"
      secret='{}'
    fi
    # key <TAB> path <TAB> mode (decimal, as the API stores it) <TAB> base64 value ("-": no
    # such key) for every file of the volume: the items chosen (a missing key skipped only when
    # optional), else every key.
    files=$(jq -r --argjson vol "$vol" '
      (.data // {}) as $d | ($vol.secret.defaultMode // 420) as $mode
      | if $vol.secret.items then $vol.secret.items[]
          | select($d[.key] != null or ($vol.secret.optional // false | not))
          | [.key, .path, (.mode // $mode), ($d[.key] // "-")]
        else $d | keys[] | [., ., $mode, $d[.]] end
      | @tsv' <<<"$secret")
    # A new copy, then ..data switched to it; the top-level names are links through ..data.
    local copy value
    copy=..$(date +%Y_%m_%d_%H_%M_%S.%N)
    mkdir -m 0755 "$dir/$copy"
    while IFS=$'\t' read -r key path mode value; do
      [[ -n $key ]] || continue
      [[ $value != - ]] || die "volume $name: the Secret $POD_NS/$sname has no key $key (named in items; not optional)"
      mkdir -p "$(dirname "$dir/$copy/$path")"
      base64 -d <<<"$value" >"$dir/$copy/$path"
      chmod "$(printf '%o' "$mode")" "$dir/$copy/$path"
    done <<<"$files"
    ln -sfn "$copy" "$dir/..data_tmp"
    mv -T "$dir/..data_tmp" "$dir/..data"
    local old
    for old in "$dir"/* "$dir"/..[0-9]*; do
      [[ -e $old || -L $old ]] || continue
      [[ $old == "$dir/$copy" ]] || rm -rf "$old"
    done
    for path in "$dir/$copy"/*; do
      [[ -e $path ]] && ln -s "..data/${path##*/}" "$dir/${path##*/}"
    done
    return 0
  }
  mount_volumes() { # container-JSON [root]
    local name mpath vol hpath src root=${2:-}
    while IFS=$'\t' read -r name mpath; do
      vol=$(jq -c --arg n "$name" '.volumes[] | select(.name == $n)' <<<"$spec")
      if [[ $(jq -r 'has("secret")' <<<"$vol") == true ]]; then
        secret_volume "$vol"
        mpath=$root$mpath
        mkdir -p "$mpath"
        mount --bind "$VOLUME_DIR" "$mpath"
        mount -o remount,bind,ro "$mpath"
        continue
      fi
      hpath=$(jq -r '.hostPath.path // empty' <<<"$vol")
      [[ -n $hpath ]] || die "volume $name is neither a hostPath nor a secret: the lab cannot provide it"
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
