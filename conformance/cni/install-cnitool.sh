#!/usr/bin/env bash
# Builds cnitool (libcni's own command-line runtime, from the Go module proxy) into a cache
# directory outside the clone, keyed by version; prints its path. The conformance harness
# calls weft-cni through it, as a container runtime calls plugins through libcni.
set -euo pipefail
VERSION=${WEFT_CNITOOL_VERSION:-v1.3.0}
DIR="${WEFT_CACHE:-/var/cache/weft}/cnitool-$VERSION"
if [[ -x "$DIR/cnitool" ]]; then echo "$DIR/cnitool"; exit 0; fi
command -v go >/dev/null || { [[ -x /usr/local/go/bin/go ]] && export PATH="/usr/local/go/bin:$PATH"; }
echo "[install-cnitool] building github.com/containernetworking/cni/cnitool@$VERSION" >&2
mkdir -p "$DIR.tmp"
GOBIN="$DIR.tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 10 go install -trimpath \
  "github.com/containernetworking/cni/cnitool@$VERSION" >&2
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
echo "$DIR/cnitool"
