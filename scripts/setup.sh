#!/usr/bin/env bash
# Installs what weft's build, tests and lab need on a Debian 12 machine, as root. Idempotent:
# a second run only checks. Sourced by lab.sh and test-all.sh; runnable on its own.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] weft's tests and lab create network namespaces and program nftables: run as root." >&2
  exit 1
fi

# Debian packages: nft and ip as independent readers in tests, libnftnl/libmnl for the netlink
# backend, openssl for the test cluster's certificates, iperf3/socat/tcpdump for traffic tests.
PKGS=(nftables iproute2 libnftnl-dev libmnl-dev pkg-config build-essential openssl ca-certificates
      iperf3 socat tcpdump procps psmisc curl jq)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "Debian packages present (${#PKGS[@]} checked)"
fi

# Rust: the machine image provides rustup's toolchain; Debian's cargo is too old (needs >= 1.95:
# weft-mesh's userspace WireGuard crate requires it).
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "[setup] no cargo found: install Rust >= 1.95 (rustup) first" >&2
  exit 1
fi
rustv=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.95.0\n' "$rustv" | sort -V | sed -n 1p)" != "1.95.0" ]; then
  echo "[setup] rustc $rustv is older than 1.95.0" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep "^$c" >/dev/null || { say "adding rust component $c"; rustup component add "$c"; }
  done
fi
say "rust $rustv, $(nft --version), $(ip -V)"

# Go builds the real Kubernetes components for the cluster tier (conformance/k8s/install.sh).
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null 2>&1 && say "$(go version)" || say "no Go toolchain: the cluster tier will fail"

# The kernel must have nf_tables (checked inside a throwaway namespace, never in the root one).
ns="weft-setup-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
if ip netns exec "$ns" nft add table inet weft-probe 2>/dev/null; then
  say "kernel $(uname -r): nf_tables works in a network namespace"
else
  echo "[setup] kernel $(uname -r): cannot create an nftables table in a namespace" >&2
  exit 1
fi
