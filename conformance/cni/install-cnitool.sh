#!/usr/bin/env bash
# Builds CNI tools from the Go module proxy into a cache directory outside the clone, keyed by
# version, and prints the path of the one asked for:
#
#   install-cnitool.sh             cnitool (libcni's own command-line runtime): the conformance
#                                  harness calls weft-cni through it, as a container runtime
#                                  calls plugins through libcni
#   install-cnitool.sh --portmap   the reference `portmap` plugin (hostPort), which weft's
#                                  conflist chains after weft-cni
set -euo pipefail
command -v go >/dev/null || { [[ -x /usr/local/go/bin/go ]] && export PATH="/usr/local/go/bin:$PATH"; }
build() { # cache-dir binary-name module-path@version
  local dir=$1 bin=$2 pkg=$3
  if [[ -x "$dir/$bin" ]]; then echo "$dir/$bin"; return 0; fi
  echo "[install-cnitool] building $pkg" >&2
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 10 go install -trimpath "$pkg" >&2
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "$dir/$bin"
}
CACHE=${WEFT_CACHE:-/var/cache/weft}
case ${1:-} in
  --portmap)
    V=${WEFT_CNI_PLUGINS_VERSION:-v1.9.1}
    build "$CACHE/cni-plugins-$V" portmap "github.com/containernetworking/plugins/plugins/meta/portmap@$V" ;;
  "")
    V=${WEFT_CNITOOL_VERSION:-v1.3.0}
    build "$CACHE/cnitool-$V" cnitool "github.com/containernetworking/cni/cnitool@$V" ;;
  *) echo "usage: install-cnitool.sh [--portmap]" >&2; exit 2 ;;
esac
