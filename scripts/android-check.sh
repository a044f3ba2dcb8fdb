#!/usr/bin/env bash
# `just android-check`: the phone build checked without a phone, by
# EMULATION (qemu-user runs the aarch64 binary on this computer):
#   a. `llnode run` of the aarch64 build under qemu prints exactly what the
#      x86-64 build prints (greedy, one segment and three);
#   b. a mixed mesh, one aarch64 node under qemu and two native nodes on
#      127.0.0.1, with memory caps that need all three, answers `llnode
#      prompt` (asked on a native node and on the aarch64 one) like `llnode run`;
#   c. `android-build/deploy.sh` against android-build/fake-adb: no device;
#      then two arm64 devices deployed next to a 32-bit, an unauthorised and a
#      full one (each refused with its message), status, a prompt answered,
#      a re-deploy that keeps keys and certificates, stop.
# Each part's time is printed at the end. Needs `just android-setup`.
# --skip-build uses the binaries already built. LLNODE=path uses that x86-64
# llnode (a debug build prints the same text) instead of building a release one.
# --run-only stops after a. (CI runs that much, on the ANDROID_PROFILE=check
# build: the whole check does not fit in CI's time on two cores.)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
root=$PWD

target_dir=${CARGO_TARGET_DIR:-target}
host=${LLNODE:-$target_dir/release/llnode}
arm=$target_dir/android/llnode-aarch64-unknown-linux-musl
prompt_args=(--max-tokens 24 --ignore-eos)
text="The mesh of phones"

fail() { printf 'android-check: FAILED: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*" >&2; }

skip_build="" run_only=""
for arg in "$@"; do
    case $arg in
        --skip-build) skip_build=1 ;;
        --run-only) run_only=1 ;;
        *) fail "unknown option $arg (known: --skip-build, --run-only)" ;;
    esac
done

timings=()
started=$SECONDS
timed() { timings+=("$(printf '%-44s %4d s' "$1" $((SECONDS - started)))"); started=$SECONDS; }
passed() {
    say "$1 (by emulation: qemu-user, no phone). Times:"
    printf '%s\n' "${timings[@]}" >&2
}

qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
[[ -n $qemu ]] || fail "qemu-aarch64-static not found; run \`just android-setup\` (apt-get install qemu-user-static)"

if [[ -z $skip_build ]]; then
    say "cross build (aarch64 musl)"
    bash android-build/build.sh
    timed "build: aarch64-unknown-linux-musl"
    if [[ -z ${LLNODE:-} ]]; then
        say "native build"
        cargo build --release -p llnode
        timed "build: x86-64 (host)"
    fi
fi
[[ -x $host && -f $arm ]] || fail "$host or $arm is missing; run without --skip-build"

work=$(mktemp -d /tmp/llnode-android.XXXXXX)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -d $work/adb/devices ]]; then ADB=$root/android-build/fake-adb FAKE_ADB_HOME=$work/adb bash android-build/deploy.sh stop >/dev/null 2>&1 || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Memory holding `share` of the model's weights and a 1024-token KV cache, in bytes.
share_of() {
    awk -v share="$2" '/"cost":/ { cost = 1 }
        cost && /"weight_bytes":/ { gsub(/[^0-9]/, ""); n += $0 }
        cost && /"kv_bytes_per_token":/ { gsub(/[^0-9]/, ""); n += 1024 * $0 }
        END { printf "%d", n * share }' "$1/manifest.json"
}

# --- a. the same text under qemu ---------------------------------------------
say "a. llnode run: x86-64 vs aarch64 under qemu"
"$host" model synth --size tiny -o "$work/export" 2>/dev/null
"$host" import "$work/export" -o "$work/tiny" >/dev/null 2>&1
timed "model: synth and import (native)"
reference=$("$host" run -m "$work/tiny" "${prompt_args[@]}" "$text")
[[ -n $reference ]] || fail "the native build printed nothing"
got=$("$qemu" "$arm" run -m "$work/tiny" "${prompt_args[@]}" "$text")
timed "a. qemu: llnode run (24 tokens)"
[[ $got == "$reference" ]] || fail "aarch64 under qemu printed '$got', x86-64 printed '$reference'"
got=$("$qemu" "$arm" run -m "$work/tiny" --segments 3 "${prompt_args[@]}" "$text")
[[ $got == "$reference" ]] || fail "aarch64 with --segments 3 printed '$got', x86-64 printed '$reference'"
timed "a. qemu: llnode run --segments 3"
say "a. ok: both print the same text"
if [[ -n $run_only ]]; then
    passed "the aarch64 build prints what the x86-64 build prints"
    exit 0
fi

# --- b. a mixed mesh ------------------------------------------------------------
say "b. a mesh of two native nodes and one aarch64 node under qemu"
mesh=$work/mesh
mkdir -p "$mesh"
"$host" mesh init --data-dir "$mesh/n0" --name native-0 >/dev/null 2>&1
peer=$("$qemu" "$arm" id --data-dir "$mesh/n1")
"$host" mesh certify --data-dir "$mesh/n0" "$peer" --name arm64-1 -o "$mesh/n1.cert" 2>/dev/null
"$qemu" "$arm" mesh install --data-dir "$mesh/n1" "$mesh/n1.cert" >/dev/null
peer=$("$host" id --data-dir "$mesh/n2")
"$host" mesh certify --data-dir "$mesh/n0" "$peer" --name native-2 -o "$mesh/n2.cert" 2>/dev/null
"$host" mesh install --data-dir "$mesh/n2" "$mesh/n2.cert" >/dev/null

# 45% of the model each: two nodes cannot hold it, so the plan needs all three.
memory=$(share_of "$work/tiny" 0.45)
first=""
start() {
    local i=$1
    shift
    local args=(start --data-dir "$mesh/n$i" --listen /ip4/127.0.0.1/tcp/0 --no-mdns --model "$work/tiny" --memory "$memory")
    [[ -z $first ]] || args+=(--peer "$first")
    RUST_LOG=info "$@" "${args[@]}" >"$mesh/n$i.out" 2>"$mesh/n$i.log" &
    pids+=($!)
    local deadline=$((SECONDS + 60)) line=""
    while ((SECONDS < deadline)); do
        line=$(grep '^ready ' "$mesh/n$i.out" || true)
        [[ -z $line ]] || break
        sleep 0.2
    done
    [[ -n $line ]] || fail "node n$i did not start: $(tail -n 3 "$mesh/n$i.log")"
    local words
    read -ra words <<<"$line"
    [[ -n $first ]] || first=${words[2]}/p2p/${words[1]}
}
start 0 "$host"
start 1 "$qemu" "$arm"
start 2 "$host"

# Until every node holds the same plan, with three stages, for 2 s.
plans() {
    local i
    for i in 0 1 2; do "$host" plan --data-dir "$mesh/n$i" | grep -E '^plan:|^[0-9]+ ' || true; done
}
deadline=$((SECONDS + 180))
stable=""
since=$SECONDS
while true; do
    now=$(plans)
    if [[ $(grep -c '^plan: epoch' <<<"$now") == 3 && $(grep -c 'arm64-1' <<<"$now") == 3 &&
        $(sort -u <<<"$now" | grep -c '^plan: epoch') == 1 ]]; then
        if [[ $now == "$stable" ]]; then
            ((SECONDS - since < 2)) || break
        else
            stable=$now
            since=$SECONDS
        fi
    fi
    ((SECONDS < deadline)) || fail "the mixed mesh did not agree on a plan with all three nodes within 180 s; last seen:
$now"
    sleep 0.5
done
"$host" plan --data-dir "$mesh/n0" >&2
timed "b. mixed mesh: start and agree on a plan"
got=$("$host" prompt --data-dir "$mesh/n2" "${prompt_args[@]}" "$text")
[[ $got == "$reference" ]] || fail "the mixed mesh answered '$got' on a native node; llnode run printed '$reference'"
got=$("$qemu" "$arm" prompt --data-dir "$mesh/n1" "${prompt_args[@]}" "$text")
[[ $got == "$reference" ]] || fail "the mixed mesh answered '$got' on the aarch64 node; llnode run printed '$reference'"
timed "b. mixed mesh: two prompts"
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
say "b. ok: the mixed mesh answers like one process"

# --- c. deploy against emulated devices ----------------------------------------
say "c. android-deploy against fake-adb (emulated devices)"
export ADB=$root/android-build/fake-adb FAKE_ADB_HOME=$work/adb
export LLNODE=$host LLNODE_ANDROID_BIN=$arm LLNODE_ANDROID_HOME=$work/computer LLNODE_ANDROID_MODEL=$work/tiny
export LLNODE_ANDROID_LISTEN=/ip4/127.0.0.1/tcp/0
# 60% each: the two phones share the model.
memory=$(share_of "$work/tiny" 0.6)
export LLNODE_ANDROID_START_ARGS="--no-mdns --memory $memory"
export LLNODE_ANDROID_PROMPT_ARGS="${prompt_args[*]}"
deploy() { bash android-build/deploy.sh "$@"; }

set +e
out=$(deploy deploy 2>&1)
rc=$?
set -e
[[ $rc == 1 && $out == *"no device attached"* ]] || fail "with no device, deploy said (exit $rc): $out"

"$ADB" emulate add phone-a model="Pixel 8"
"$ADB" emulate add phone-b model="Galaxy S23"
"$ADB" emulate add old-phone abi=armeabi-v7a model="Galaxy S5"
"$ADB" emulate add locked state=unauthorized
"$ADB" emulate add full free-kb=20000
set +e
out=$(deploy deploy 2>&1)
rc=$?
set -e
printf '%s\n' "$out" >&2
[[ $rc == 2 ]] || fail "deploy with two good and three bad devices should exit 2, not $rc"
for expect in "old-phone: a 32-bit phone" "locked: unauthorised" "full: not enough storage" \
    "phone-a .* running" "phone-b .* running"; do
    grep -q "$expect" <<<"$out" || fail "deploy's output lacks '$expect'"
done
timed "c. deploy: 2 devices (+3 refused)"

deadline=$((SECONDS + 180))
until status=$(deploy status phone-a phone-b) && [[ $(grep -c 'plan epoch .* with 2 stage' <<<"$status") == 2 ]]; do
    ((SECONDS < deadline)) || fail "the deployed devices did not agree on a two-stage plan within 180 s:
$status"
    sleep 1
done
printf '%s\n' "$status" >&2
got=$(deploy prompt "$text")
[[ $got == "$reference" ]] || fail "the deployed mesh answered '$got'; llnode run printed '$reference'"
timed "c. deploy: plan, status and a prompt"

ids_before=$(grep -o '12D3Koo[1-9A-Za-z]*' <<<"$status" | sort)
out=$(deploy deploy phone-a phone-b 2>&1) || fail "re-deploying failed: $out"
printf '%s\n' "$out" >&2
ids_after=$(grep -o '12D3Koo[1-9A-Za-z]*' <<<"$out" | sort)
[[ $ids_before == "$ids_after" ]] || fail "re-deploying changed the peer ids: $ids_before -> $ids_after"
[[ $(find "$LLNODE_ANDROID_HOME/devices" -name '*.cert' | wc -l) == 2 ]] || fail "re-deploying issued new certificates"
deadline=$((SECONDS + 180))
until status=$(deploy status phone-a phone-b) && [[ $(grep -c 'plan epoch .* with 2 stage' <<<"$status") == 2 ]]; do
    ((SECONDS < deadline)) || fail "after the upgrade, no two-stage plan within 180 s:
$status"
    sleep 1
done
got=$(deploy prompt "$text")
[[ $got == "$reference" ]] || fail "after the upgrade the mesh answered '$got'; llnode run printed '$reference'"
timed "c. re-deploy (upgrade) and a prompt"

deploy stop >&2
status=$(deploy status phone-a phone-b)
[[ $(grep -c stopped <<<"$status") == 2 ]] || fail "after stop, status says: $status"
timed "c. stop"
say "c. ok: deployed, refused the bad devices, answered, upgraded, stopped"

passed "all Android checks passed"
