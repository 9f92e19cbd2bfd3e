#!/usr/bin/env bash
# `make setup-mcu`: what running Cortex-M4 projects under qemu-system-arm needs (tvm-scalpel run
# OUT_DIR, tests/test_mcu_firmware.py): the bare-metal ARM toolchain, newlib (with the
# semihosting library rdimon) and qemu's system emulator for the mps2-an386 board.
# Idempotent: apt-get runs only when one of them is missing, and installs only those missing.
set -euo pipefail

say() { echo "setup-mcu: $*"; }
die() { echo "setup-mcu: error: $*" >&2; exit 1; }

# package -> what shows it is installed
have_gcc()    { command -v arm-none-eabi-gcc >/dev/null && command -v arm-none-eabi-size >/dev/null; }
have_newlib() { have_gcc && [ -f "$(arm-none-eabi-gcc -print-file-name=rdimon.specs)" ]; }
have_qemu()   { command -v qemu-system-arm >/dev/null; }

missing=()
have_gcc    || missing+=(gcc-arm-none-eabi)
have_newlib || missing+=(libnewlib-arm-none-eabi)
have_qemu   || missing+=(qemu-system-arm)

if [ ${#missing[@]} -eq 0 ]; then
    say "arm-none-eabi-gcc, newlib (rdimon) and qemu-system-arm present; nothing to do"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "installing ${missing[*]} needs root (or sudo)"
    SUDO=(sudo)
fi
say "installing ${missing[*]} (apt-get; about 900 MB for all three)"
export DEBIAN_FRONTEND=noninteractive
apt_install=("${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}")
if ! "${apt_install[@]}" >/dev/null; then
    say "apt-get install failed; updating the package lists and retrying"
    "${SUDO[@]}" apt-get update -q >/dev/null
    "${apt_install[@]}" >/dev/null
fi
have_gcc && have_newlib && have_qemu \
    || die "arm-none-eabi-gcc, newlib's rdimon.specs or qemu-system-arm still missing after apt-get install"
say "ready: $(arm-none-eabi-gcc --version | head -1); $(qemu-system-arm --version | head -1)"
