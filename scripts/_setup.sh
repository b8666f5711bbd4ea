# Sourced by scripts/demo, scripts/test and scripts/bench: brings a fresh Debian 12 machine
# (as root) to a state where ophamin-trace can trace. Idempotent; the second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMPS="$ROOT/.cache/stamps"
mkdir -p "$STAMPS"

say() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "setup needs root (apt packages, tracefs, kernel headers); run with sudo"; exit 1
  fi
}

apt_packages() {
  local want=(bpfcc-tools python3-bpfcc python3-venv python3-dev linux-headers-amd64 chromium chromium-driver
              bpftool strace)  # bpftool, strace: tests/test_hardening.py (no probe left; memory only read)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    need_root
    say "installing apt packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# This kernel ships no headers. bcc looks for /lib/modules/$(uname -r)/build (arch tree)
# and .../source (common tree); Debian splits its nearest headers into exactly those two
# trees, so link them there. Only uprobe/tracepoint programs are built, which do not read
# kernel structs, so a version mismatch is harmless (see BRIEF).
kernel_headers() {
  local rel moddir arch common
  rel="$(uname -r)"; moddir="/lib/modules/$rel"
  if [ -e "$moddir/build/include" ]; then return; fi
  arch="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)"
  if [ -z "$arch" ] || [ -z "$common" ]; then say "no Debian kernel headers found under /usr/src"; exit 1; fi
  need_root
  mkdir -p "$moddir"
  ln -sfn "$arch" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
  say "linked kernel headers for $rel: build -> $arch, source -> $common"
}

tracefs() {
  if [ ! -e /sys/kernel/tracing/uprobe_events ]; then
    need_root
    mount -t tracefs nodev /sys/kernel/tracing && say "mounted tracefs at /sys/kernel/tracing"
  fi
}

project_venv() {
  local stamp="$STAMPS/venv" sum
  sum="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV (Debian python3 with system site-packages, so Debian's bcc is visible)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    say "installing ophamin-trace (editable) and dev tools into the venv"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    echo "$sum" > "$stamp"
  fi
}

# Target interpreters: one venv per interpreter the BRIEF names, holding what the reference
# substrate's OpenTelemetry emitter needs. The interpreter image inside stays the original
# one (a venv's python is a symlink), so discovery sees the same binary.
target_venvs() {
  local stamp="$STAMPS/targets-v1"
  [ -f "$stamp" ] && return
  "$VENV/bin/python" -m tracer.interpreters --make-venvs "$ROOT/.cache/targets"
  touch "$stamp"
}

setup_all() {
  apt_packages
  kernel_headers
  tracefs
  project_venv
  target_venvs
}
