#!/usr/bin/env bash
# Build pinned etcd + Kubernetes control-plane binaries from the Go module proxy
# into a version-keyed cache directory outside the clone.
#
#   conformance/k8s/install.sh            # build if needed, print the bin dir
#   conformance/k8s/install.sh --print    # only print the bin dir (no build, no check)
#
# Env:
#   WEFT_CACHE        cache root (default /var/cache/weft)
#   WEFT_K8S_VERSION  k8s.io/kubernetes version (default below)
#   WEFT_ETCD_VERSION go.etcd.io/etcd/server/v3 version (default below)
#
# Idempotent: when every binary is present and reports the pinned version, it
# only prints where they are. See README.md for the recipe and measured times.
set -euo pipefail

K8S_VERSION=${WEFT_K8S_VERSION:-v1.37.2}
ETCD_VERSION=${WEFT_ETCD_VERSION:-v3.7.3}
CACHE_ROOT=${WEFT_CACHE:-/var/cache/weft}
KEY="${K8S_VERSION#v}-etcd${ETCD_VERSION#v}"
BIN_DIR="$CACHE_ROOT/k8s/$KEY/bin"

K8S_CMDS=(kube-apiserver kube-controller-manager kube-proxy kubectl)

if [[ "${1:-}" == --print ]]; then
  echo "$BIN_DIR"
  exit 0
fi

START=$(date +%s)
log() { printf '[install.sh +%4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- version checks (used for idempotence and to verify fresh builds) -------
bin_ok() { # name -> 0 when $BIN_DIR/name exists and reports the pinned version
  local name=$1 out
  [[ -x "$BIN_DIR/$name" ]] || return 1
  case $name in
    etcd)    out=$(timeout 20 "$BIN_DIR/etcd" --version 2>/dev/null) || return 1
             grep -qx "etcd Version: ${ETCD_VERSION#v}" <<<"$out" ;;
    kubectl) out=$(timeout 20 "$BIN_DIR/kubectl" version --client 2>/dev/null) || return 1
             grep -qx "Client Version: ${K8S_VERSION}" <<<"$out" ;;
    *)       out=$(timeout 20 "$BIN_DIR/$name" --version 2>/dev/null) || return 1
             [[ "$out" == "Kubernetes ${K8S_VERSION}" ]] ;;
  esac
}
all_ok() {
  local n
  for n in etcd "${K8S_CMDS[@]}"; do bin_ok "$n" || return 1; done
}

if all_ok; then
  log "up to date: Kubernetes $K8S_VERSION, etcd $ETCD_VERSION"
  echo "$BIN_DIR"
  exit 0
fi

# --- prerequisites -------------------------------------------------------------
command -v go >/dev/null || die "go not found in PATH (need Go >= 1.26.0)"
mkdir -p "$BIN_DIR" || die "cannot create $BIN_DIR"

# One build at a time per cache key.
exec 9>"$BIN_DIR/.lock"
flock -w 3600 9 || die "timed out waiting for another install.sh holding $BIN_DIR/.lock"
if all_ok; then   # somebody else finished while we waited
  log "up to date (built concurrently): $BIN_DIR"
  echo "$BIN_DIR"
  exit 0
fi

WORK=$(mktemp -d /tmp/weft-k8s-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false"
# Go's own default; both releases pinned here declare `go 1.26.0`. An older local
# go switches to a newer toolchain fetched from the module proxy (golang.org/toolchain).
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOPROXY=${GOPROXY:-https://proxy.golang.org,direct}
NICE=(nice -n 10)
log "go: $(go version) (GOTOOLCHAIN=$GOTOOLCHAIN); GOMODCACHE=$(go env GOMODCACHE) GOCACHE=$(go env GOCACHE)"

step() { # label, command...
  local label=$1 t0 rc=0; shift
  t0=$(date +%s)
  log "step: $label ..."
  "$@" >"$WORK/step.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    tail -n 40 "$WORK/step.log" >&2
    die "step failed (exit $rc): $label"
  fi
  log "step: $label done in $(($(date +%s) - t0))s"
}

# --- etcd ----------------------------------------------------------------------
if ! bin_ok etcd; then
  mkdir -p "$WORK/etcd"
  cat >"$WORK/etcd/go.mod" <<EOF
module weft.local/etcdbuild

go 1.26.0
EOF
  (
    cd "$WORK/etcd"
    step "resolve go.etcd.io/etcd/server/v3@$ETCD_VERSION" \
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    step "build etcd $ETCD_VERSION" \
      "${NICE[@]}" go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
      -o "$WORK/out/etcd" go.etcd.io/etcd/server/v3
  )
  mv -f "$WORK/out/etcd" "$BIN_DIR/etcd"
  bin_ok etcd || die "built etcd does not report version ${ETCD_VERSION#v}: $("$BIN_DIR/etcd" --version 2>&1 | sed -n 1,3p)"
fi

# --- Kubernetes ----------------------------------------------------------------
need_k8s=()
for n in "${K8S_CMDS[@]}"; do bin_ok "$n" || need_k8s+=("$n"); done
if ((${#need_k8s[@]})); then
  mkdir -p "$WORK/k8s"
  cd "$WORK/k8s"
  step "fetch k8s.io/kubernetes $K8S_VERSION go.mod" \
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION"
  k8s_mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f "$k8s_mod" ]] || die "cannot locate go.mod of k8s.io/kubernetes@$K8S_VERSION"
  # In k8s.io/kubernetes, every staging module is required as v0.0.0 and replaced
  # by ./staging/src/...; replaces of a dependency are ignored, so replace each
  # here with the published v0.<minor>.<patch> of the same module.
  staging_ver="v0.${K8S_VERSION#v1.}"
  mapfile -t staging < <(awk '/^require \(/{r=1;next} r&&/^\)/{r=0} r&&$2=="v0.0.0"{print $1}' "$k8s_mod")
  ((${#staging[@]} > 10)) || die "found only ${#staging[@]} staging modules in $k8s_mod"
  go_line=$(awk '$1=="go"{print $2; exit}' "$k8s_mod")
  {
    echo "module weft.local/k8sbuild"
    echo
    echo "go $go_line"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_ver"; done
    echo ")"
  } >go.mod
  log "k8s.io/kubernetes $K8S_VERSION needs go $go_line; ${#staging[@]} staging modules pinned at $staging_ver"
  pkgs=()
  for n in "${need_k8s[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n@$K8S_VERSION"); done
  step "resolve dependencies of ${need_k8s[*]}" go get "${pkgs[@]}"

  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  for n in "${need_k8s[@]}"; do
    step "build $n $K8S_VERSION" \
      "${NICE[@]}" go build -trimpath -ldflags "$ldflags" -o "$WORK/out/$n" "k8s.io/kubernetes/cmd/$n"
    mv -f "$WORK/out/$n" "$BIN_DIR/$n"
    bin_ok "$n" || die "built $n does not report $K8S_VERSION: $("$BIN_DIR/$n" --version 2>&1 | sed -n 1,3p)"
  done
fi

all_ok || die "binaries in $BIN_DIR do not all report the pinned versions"
log "done: Kubernetes $K8S_VERSION, etcd $ETCD_VERSION in $BIN_DIR (total $(($(date +%s) - START))s)"
echo "$BIN_DIR"
