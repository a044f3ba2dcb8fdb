#!/usr/bin/env bash
# `just android-build`: llnode for 64-bit Android phones.
#
# Always: a static aarch64-unknown-linux-musl binary (it runs from `adb shell`
# and Termux on any arm64 Android), linked with Debian's aarch64-linux-gnu-gcc
# and the C runtime Rust ships for the musl target. With ANDROID_NDK_HOME
# set: also aarch64-linux-android, with the NDK's clang (ANDROID_API, default
# 24 = Android 7). Stripped copies for the phones (a seventh of the size: no
# line tables) land in $CARGO_TARGET_DIR (default target/) as
# android/llnode-<target>. `just android-setup` installs what this needs.
# ANDROID_PROFILE=check builds for the emulated check only (CI): the dev
# profile with every dependency but tract's kernels unoptimised, in a quarter
# of the release build's time. It prints the same text, far slower.
set -euo pipefail
cd "$(dirname "$0")/.."

musl=aarch64-unknown-linux-musl
android=aarch64-linux-android
target_dir=${CARGO_TARGET_DIR:-target}
profile=${ANDROID_PROFILE:-release}
cargo_profile=(--profile "$profile")
out_dir=$profile
case $profile in
    dev) out_dir=debug ;;
    check)
        cargo_profile=(--profile dev --config 'profile.dev.package."*".opt-level=0')
        out_dir=debug
        ;;
esac

need() {
    command -v "$1" >/dev/null || { echo "error: $1 not found; run \`just android-setup\` (it installs $2)" >&2; exit 1; }
}

has_target() {
    rustup target list --installed 2>/dev/null | grep -qx "$1" ||
        { echo "error: the Rust target $1 is not installed; run \`rustup target add $1\` (or \`just android-setup\`)" >&2; exit 1; }
}

need aarch64-linux-gnu-gcc "gcc-aarch64-linux-gnu"
has_target "$musl"

# The cc crate (aws-lc, tract's assembly kernels) and the final link use the
# Debian cross compiler; Rust's self-contained musl crt and libc make the
# binary static, so glibc's cross libraries are never linked in.
export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc

# With the NDK: check it before the long build, not after.
if [[ -n ${ANDROID_NDK_HOME:-} ]]; then
    api=${ANDROID_API:-24}
    host_tag=$(uname -s | tr '[:upper:]' '[:lower:]')-x86_64
    ndk_bin=$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/$host_tag/bin
    clang=$ndk_bin/$android$api-clang
    [[ -x $clang ]] || {
        echo "error: $clang not found; point ANDROID_NDK_HOME at an NDK r23 or newer (it has toolchains/llvm/prebuilt/$host_tag), or set ANDROID_API to a level it ships" >&2
        exit 1
    }
    has_target "$android"
fi

echo "building llnode for $musl ($profile profile, static; the first build takes a while)…" >&2
cargo build "${cargo_profile[@]}" -p llnode --target "$musl"
mkdir -p "$target_dir/android"
aarch64-linux-gnu-strip -o "$target_dir/android/llnode-$musl" "$target_dir/$musl/$out_dir/llnode"
built=("$target_dir/android/llnode-$musl")

if [[ -n ${ANDROID_NDK_HOME:-} ]]; then
    export CC_aarch64_linux_android=$clang
    export CXX_aarch64_linux_android=$clang++
    export AR_aarch64_linux_android=$ndk_bin/llvm-ar
    export CARGO_TARGET_AARCH64_LINUX_ANDROID_LINKER=$clang
    export ANDROID_NDK_ROOT=$ANDROID_NDK_HOME
    echo "building llnode for $android (NDK clang, API $api)…" >&2
    cargo build "${cargo_profile[@]}" -p llnode --target "$android"
    "$ndk_bin/llvm-strip" -o "$target_dir/android/llnode-$android" "$target_dir/$android/$out_dir/llnode"
    built+=("$target_dir/android/llnode-$android")
else
    echo "note: ANDROID_NDK_HOME is not set, so only the static musl build was made (it runs on Android as is)" >&2
fi

for binary in "${built[@]}"; do
    echo "$binary ($(du -h "$binary" | cut -f1))"
done
