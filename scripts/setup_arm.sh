#!/usr/bin/env bash
# `make setup-arm`: what running aarch64 models under qemu-aarch64 through TVM RPC needs.
#   1. Debian packages: the aarch64 cross toolchain (to link the libraries) and qemu-user.
#   2. .arm/sysroot: an arm64 Python 3.11 with libstdc++, fetched by a private apt
#      configuration (its own state, cache and lists; the host's dpkg architectures and
#      package database are never touched) and unpacked with dpkg-deb -x.
#   3. .arm/pyarm: aarch64 wheels of the same apache-tvm / apache-tvm-ffi as .venv/ (the RPC
#      protocol and the library ABI must match), installed with pip --target.
# Idempotent: .arm/.ready is written last, only after everything succeeded, and records the TVM
# versions; a second run with the same versions does nothing. Steps 2 and 3 build in a scratch
# folder that is renamed into place, so an interrupted run never leaves a half-built sysroot
# that counts as ready. TVM_SCALPEL_ARM_DIR overrides where .arm/ is.
set -euo pipefail
cd "$(dirname "$0")/.."

ARM_DIR="${TVM_SCALPEL_ARM_DIR:-$PWD/.arm}"
PY="${PYTHON_VENV:-.venv/bin/python}"
DEBS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
PLATFORM=(--only-binary=:all: --python-version 3.11 --platform manylinux_2_28_aarch64
          --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64)
WHEELS=(apache-tvm apache-tvm-ffi numpy ml_dtypes typing_extensions cloudpickle psutil)

say() { echo "setup-arm: $*"; }
die() { echo "setup-arm: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. cross toolchain and qemu
if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    say "aarch64-linux-gnu-gcc and qemu-aarch64 present"
else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "installing ${DEBS[*]} needs root (or sudo)"
        SUDO=(sudo)
    fi
    say "installing ${DEBS[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install=("${SUDO[@]}" apt-get install -y -q --no-install-recommends "${DEBS[@]}")
    if ! "${apt_install[@]}" >/dev/null; then
        say "apt-get install failed; updating the package lists and retrying"
        "${SUDO[@]}" apt-get update -q >/dev/null
        "${apt_install[@]}" >/dev/null
    fi
    command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null \
        || die "aarch64-linux-gnu-gcc or qemu-aarch64 still missing after apt-get install"
fi

# ---------------------------------------------------------------- 2 + 3. sysroot and wheels
[ -x "$PY" ] || die "$PY not found: run \`make setup\` first"
# the wheels must be the versions .venv/ runs: read them from there, not from a guess
pins="$("$PY" -c '
import importlib.metadata as m, sys
pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pins.append(name)  # not in .venv: the newest aarch64 wheel
print(" ".join(pins))' "${WHEELS[@]}")"
read -r -a PINS <<<"$pins"
STAMP_TEXT="$(printf '%s\n' "${PINS[@]:0:2}")"  # the TVM versions the sysroot was built for

if [ -f "$ARM_DIR/.ready" ] && [ "$(cat "$ARM_DIR/.ready")" = "$STAMP_TEXT" ] \
        && [ -x "$ARM_DIR/sysroot/usr/bin/python3.11" ] && [ -d "$ARM_DIR/pyarm/tvm" ]; then
    say "$ARM_DIR is ready (${PINS[*]:0:2}); nothing to do"
    exit 0
fi

mkdir -p "$ARM_DIR"
rm -rf "$ARM_DIR/.ready" "$ARM_DIR"/.build.*  # and what an interrupted run left
WORK="$(mktemp -d "$ARM_DIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"  # apt downloads as the unprivileged _apt user where it can reach the folder

say "arm64 Python 3.11 sysroot (private apt configuration in a scratch folder)"
APT="$WORK/apt"
mkdir -p "$APT"/{state/lists/partial,cache/archives/partial,etc/sources.list.d,etc/apt.conf.d,etc/preferences.d}
touch "$APT/state/status"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then  # Debian 12's default
    cp /etc/apt/sources.list.d/debian.sources "$APT/etc/sources.list.d/"
elif [ -f /etc/apt/sources.list ]; then
    cp /etc/apt/sources.list "$APT/etc/sources.list"
else
    die "no Debian sources in /etc/apt to copy"
fi
{
    apt-config dump Acquire  # the host's proxy and validity settings, none of its hooks
    cat <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
Dir::State "$APT/state";
Dir::State::status "$APT/state/status";
Dir::Cache "$APT/cache";
Dir::Etc::SourceList "$APT/etc/sources.list";
Dir::Etc::SourceParts "$APT/etc/sources.list.d";
Dir::Etc::Parts "$APT/etc/apt.conf.d";
Dir::Etc::Preferences "$APT/etc/preferences";
Dir::Etc::PreferencesParts "$APT/etc/preferences.d";
EOF
} >"$APT/apt.conf"
export APT_CONFIG="$APT/apt.conf"
apt-get update -q >/dev/null
apt-get install -d -y -q python3.11 libstdc++6 libgcc-s1 >/dev/null
unset APT_CONFIG
debs=("$APT"/cache/archives/*.deb)
[ -e "${debs[0]}" ] || die "apt-get downloaded no arm64 packages"
mkdir -p "$WORK/sysroot"
for deb in "${debs[@]}"; do
    dpkg-deb -x "$deb" "$WORK/sysroot"
done
[ -x "$WORK/sysroot/usr/bin/python3.11" ] || die "python3.11 missing from the arm64 packages"
say "  ${#debs[@]} packages unpacked ($(du -sh "$WORK/sysroot" | cut -f1))"

say "aarch64 wheels: ${PINS[*]}"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WORK/wheels" "${PINS[@]}"
"$PY" -m pip install -q --no-deps --no-index "${PLATFORM[@]}" --target "$WORK/pyarm" "$WORK"/wheels/*.whl
rm -f "$WORK/pyarm/tvm/lib/libtvm_compiler.so"  # 240 MB; the server only needs libtvm_runtime
[ -f "$WORK/pyarm/tvm/lib/libtvm_runtime.so" ] || die "no libtvm_runtime.so in the aarch64 apache-tvm wheel"
say "  $(ls "$WORK/wheels" | wc -l) wheels installed ($(du -sh "$WORK/pyarm" | cut -f1))"

rm -rf "$ARM_DIR/sysroot" "$ARM_DIR/pyarm"
mv "$WORK/sysroot" "$WORK/pyarm" "$ARM_DIR/"
printf '%s\n' "$STAMP_TEXT" >"$ARM_DIR/.ready"
say "ready: $ARM_DIR (start a server with: .venv/bin/python -m tvm_scalpel.emulation)"
