#!/usr/bin/env bash
# `just android-setup`: what `just android-build`, `android-deploy` and
# `android-check` need on a Debian or Ubuntu computer: the Rust targets, the
# aarch64 C cross compiler, qemu-user (for the emulated checks) and adb.
set -euo pipefail

rustup target add aarch64-unknown-linux-musl
if [[ -n ${ANDROID_NDK_HOME:-} ]]; then
    rustup target add aarch64-linux-android
fi

packages=(gcc-aarch64-linux-gnu qemu-user-static adb)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "already installed: ${packages[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "error: no apt-get here; install the equivalents of: ${missing[*]} with your package manager" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "error: run as root, or install sudo, to apt-get install ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
fi
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
