#!/usr/bin/env bash
# `just android-deploy|android-status|android-logs|android-stop|android-prompt`:
# llnode on every phone `adb devices` lists, or on the serials named.
#
#   deploy.sh deploy [SERIAL...]   push the binary and the model, provision, (re)start
#   deploy.sh status [SERIAL...]   name, peer id and state of each device's node
#   deploy.sh logs   [SERIAL...]   the last $LLNODE_ANDROID_LOG_LINES (100) lines of each node's log
#   deploy.sh stop   [SERIAL...]   stop the nodes (keys, certificates and the model stay)
#   deploy.sh prompt TEXT          ask the mesh, on the first running device ($ANDROID_SERIAL picks one)
#
# This computer is the mesh owner: its owner key and the certificates it
# issued are in $LLNODE_ANDROID_HOME (default ~/.llnode-android). A phone
# keeps everything in /data/local/tmp/llnode: the binary, models/, data/ (its
# key and certificate), node.log and node.pid. Settings, all optional:
#   ADB                          the adb program (default adb; android-build/fake-adb emulates devices)
#   LLNODE                       llnode for this computer (default target/release/llnode)
#   LLNODE_ANDROID_BIN           llnode for the phones (default target/android/llnode-aarch64-unknown-linux-musl,
#                                the static build; target/android/llnode-aarch64-linux-android is the NDK one)
#   LLNODE_ANDROID_MODEL         the package to serve (default the built-in tiny model, made on first use)
#   LLNODE_ANDROID_LISTEN        --listen addresses for the phones, comma-separated (default: llnode's)
#   LLNODE_ANDROID_START_ARGS    more `llnode start` options, e.g. "--memory 1.5GiB --no-mdns"
#   LLNODE_ANDROID_PROMPT_ARGS   more `llnode prompt` options, e.g. "--max-tokens 200 --chat"
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/.." && pwd)
ADB=${ADB:-adb}
target_dir=${CARGO_TARGET_DIR:-$root/target}
host_bin=${LLNODE:-$target_dir/release/llnode}
phone_bin=${LLNODE_ANDROID_BIN:-$target_dir/android/llnode-aarch64-unknown-linux-musl}
home=${LLNODE_ANDROID_HOME:-$HOME/.llnode-android}
owner=$home/owner
issued=$home/devices
remote=/data/local/tmp/llnode
log_lines=${LLNODE_ANDROID_LOG_LINES:-100}

# Per-device steps run in subshells (so that `set -e` holds in them); what
# they must hand on lives in files: the table printed at the end, and the
# first node's addresses.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
touch "$work/rows" "$work/first-peer"

# A line of the table: serial, name, peer id, state.
row() { printf '%-22s %-24s %-54s %s\n' "$1" "$2" "$3" "$4" >>"$work/rows"; }
print_rows() {
    printf '%-22s %-24s %-54s %s\n' serial name "peer id" state
    cat "$work/rows"
}

say() { printf '%s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
# A per-device problem: said on stderr, and the device is skipped.
problem() { printf '%s: %s\n' "$1" "$2" >&2; }
# Single-quotes a word for the phone's shell.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Runs a command line in the phone's shell; output without carriage returns.
on() {
    local serial=$1
    shift
    "$ADB" -s "$serial" shell "$*" </dev/null | tr -d '\r'
}

# "SERIAL STATE" per device adb lists.
attached() {
    command -v "$ADB" >/dev/null ||
        fail "$ADB not found: install adb (\`just android-setup\`, or Android's platform-tools) or set ADB to its path"
    "$ADB" devices | tr -d '\r' | awk -F'\t' 'NF == 2 { print $1, $2 }'
}

# The devices to act on: every attached one, or the serials named (each once).
selected() {
    local list
    list=$(attached)
    if [[ $# -eq 0 ]]; then
        [[ -n $list ]] || fail "no device attached: plug in a phone with USB debugging on (Settings > Developer options), accept its prompt, then check \`$ADB devices\`"
        say "$list"
        return
    fi
    local serial state
    for serial in "$@"; do
        state=$(awk -v s="$serial" '$1 == s { print $2 }' <<<"$list")
        say "$serial ${state:-absent}"
    done
}

# Sets `devices` (the caller's) to the selected "SERIAL STATE" lines.
select_devices() {
    local list
    list=$(selected "$@")
    mapfile -t devices <<<"$list"
}

# Why a device in this adb state cannot be used, and what to do; empty if it can.
unusable() {
    case $1 in
        device) ;;
        unauthorized) say "unauthorised: unlock the phone, accept 'Allow USB debugging?' (tick 'Always allow'), then re-run" ;;
        offline) say "offline: reconnect the cable or run \`$ADB reconnect\`, then re-run" ;;
        absent) say "not attached (\`$ADB devices\` does not list it): check the cable, or \`$ADB connect HOST:PORT\` for Wi-Fi debugging" ;;
        no | "no permissions"*) say "no permissions: add a udev rule for this phone (see \`$ADB devices\`) or restart the adb server with access, then re-run" ;;
        *) say "in state '$1' (not booted into Android?): reboot it normally, then re-run" ;;
    esac
}

# The name a device gets in the mesh: its model and the end of its serial.
device_name() {
    local serial=$1 model
    model=$(on "$serial" getprop ro.product.model)
    model=$(tr '[:upper:]' '[:lower:]' <<<"${model:-phone}" | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
    local tail=${serial//[^A-Za-z0-9]/}
    ((${#tail} <= 4)) || tail=${tail: -4}
    say "${model:-phone}-$tail"
}

require_binaries() {
    [[ -x $host_bin ]] || fail "$host_bin not found: build it with \`cargo build --release -p llnode\` (or set LLNODE)"
    [[ -f $phone_bin ]] || fail "$phone_bin not found: build it with \`just android-build\` (or set LLNODE_ANDROID_BIN)"
}

# The package to serve; the built-in tiny model is made on first use.
model_package() {
    if [[ -n ${LLNODE_ANDROID_MODEL:-} ]]; then
        [[ -f $LLNODE_ANDROID_MODEL/manifest.json ]] ||
            fail "LLNODE_ANDROID_MODEL=$LLNODE_ANDROID_MODEL is not a package; make one with \`llnode import EXPORT -o DIR\`"
        say "$LLNODE_ANDROID_MODEL"
        return
    fi
    local package=$home/models/builtin-tiny
    if [[ ! -f $package/manifest.json ]]; then
        rm -rf "$home/models"
        mkdir -p "$home/models"
        say "making the built-in tiny model in $package…" >&2
        "$host_bin" model synth --size tiny -o "$home/models/builtin-tiny-export" 2>/dev/null
        "$host_bin" import "$home/models/builtin-tiny-export" -o "$package" >/dev/null 2>&1
    fi
    say "$package"
}

# This computer owns the mesh the phones join.
owner_init() {
    mkdir -p "$owner" "$issued"
    [[ ! -f $owner/owner.key ]] || return 0
    "$host_bin" mesh init --data-dir "$owner" --name "$(hostname)-owner" >/dev/null 2>&1
    say "this computer now owns a new mesh (its key: $owner/owner.key; keep it to add devices later)"
}

# The pid of the node running on a device, if any.
# (node.pid is checked against the process's command line, since pids are reused.)
node_pid() {
    on "$1" "pid=\$(cat $remote/node.pid 2>/dev/null) && [ -n \"\$pid\" ] &&
        tr '\\0' ' ' </proc/\$pid/cmdline 2>/dev/null | grep -q ' start --data-dir $remote/data' && echo \$pid" || true
}

stop_node() {
    local serial=$1 pid
    pid=$(node_pid "$serial")
    [[ -n $pid ]] || return 1
    # SIGTERM lets the node say goodbye and remove its control socket.
    on "$serial" "kill $pid; i=0; while [ \$i -lt 100 ] && kill -0 $pid 2>/dev/null; do sleep 0.1; i=\$((i+1)); done; kill -9 $pid 2>/dev/null; rm -f $remote/node.pid" || true
}

# Starts the node in the background and waits for its ready line. The first
# node's addresses go to the later ones as --peer (Android may drop the mDNS
# multicast a shell process does not hold a lock for): the non-loopback ones
# (phones on one Wi-Fi), or loopback if there is nothing else (emulated
# devices, which all share this computer).
start_node() {
    local serial=$1 package=$2 name=$3 peer=$4 args=() a first_peer=()
    mapfile -t first_peer <"$work/first-peer"
    if [[ -n ${LLNODE_ANDROID_LISTEN:-} ]]; then
        local listen
        IFS=, read -ra listen <<<"$LLNODE_ANDROID_LISTEN"
        for a in "${listen[@]}"; do args+=(--listen "$(q "$a")"); done
    fi
    for a in "${first_peer[@]}"; do args+=(--peer "$(q "$a")"); done
    local extra=()
    read -ra extra <<<"${LLNODE_ANDROID_START_ARGS:-}"
    for a in "${extra[@]}"; do args+=("$(q "$a")"); done
    # setsid and nohup: the node outlives this adb session.
    # Only the node is put in the background, so that $! is its pid.
    on "$serial" "cd $remote || exit 1
        [ ! -f node.log ] || mv node.log node.log.1
        detach=\$(command -v setsid || true)
        NO_COLOR=1 RUST_LOG=\${RUST_LOG:-info} \$detach nohup ./llnode start --data-dir $remote/data --model $remote/models/$(basename "$package") ${args[*]} >node.log 2>&1 </dev/null &
        echo \$! >$remote/node.pid"
    # Wait for its `ready <peer-id> <addr>...` line.
    local deadline=$((SECONDS + 120)) ready=""
    while ((SECONDS < deadline)); do
        ready=$(on "$serial" "grep '^ready ' $remote/node.log" || true)
        [[ -z $ready ]] || break
        [[ -n $(node_pid "$serial") ]] || break
        sleep 0.5
    done
    if [[ -z $ready ]]; then
        local why
        why=$(on "$serial" "grep -E '^error|ERROR' $remote/node.log | tail -n 1" || true)
        problem "$serial" "the node did not start (${why:-no ready line within 120 s}); see \`just android-logs $serial\`"
        row "$serial" "$name" "$peer" "failed: not started"
        return 1
    fi
    if [[ ${#first_peer[@]} -eq 0 ]]; then
        local id words=() others=() loop=()
        read -ra words <<<"$ready"
        id=${words[1]}
        for a in "${words[@]:2}"; do
            case $a in
                /ip4/127.* | /ip6/::1/*) loop+=("$a/p2p/$id") ;;
                /ip6/fe80:*) ;; # link-local: not dialable without its interface
                *) others+=("$a/p2p/$id") ;;
            esac
        done
        if [[ ${#others[@]} -gt 0 ]]; then
            printf '%s\n' "${others[@]}" >"$work/first-peer"
        else
            printf '%s\n' "${loop[@]}" >"$work/first-peer"
        fi
    fi
}

# Gives the device its key (made there, on first use) and a certificate from
# this computer; a device that already holds one keeps it.
provision() {
    local serial=$1 peer name
    peer=$(on "$serial" "$remote/llnode id --data-dir $remote/data")
    if [[ ! $peer =~ ^[1-9A-HJ-NP-Za-km-z]{40,}$ ]]; then
        problem "$serial" "\`llnode id\` failed on the phone ($peer); see \`$ADB -s $serial shell ls -l $remote/data\`"
        row "$serial" - - "failed: key"
        return 1
    fi
    if [[ -f $issued/$peer.cert && -n $(on "$serial" "[ -f $remote/data/certificate.cbor ] && echo yes") ]]; then
        say "$peer $(cat "$issued/$peer.name")"
        return
    fi
    name=$(device_name "$serial")
    "$host_bin" mesh certify --data-dir "$owner" "$peer" --name "$name" -o "$issued/$peer.cert" 2>/dev/null
    "$ADB" -s "$serial" push "$issued/$peer.cert" "$remote/data/mesh.cert" >/dev/null
    local out
    if ! out=$(on "$serial" "$remote/llnode mesh install --data-dir $remote/data $remote/data/mesh.cert 2>&1"); then
        rm -f "$issued/$peer.cert"
        problem "$serial" "cannot install its certificate (${out##*error: }); if it belongs to another mesh, give it a new key with \`$ADB -s $serial shell rm -r $remote/data\` and re-run, or set LLNODE_ANDROID_HOME to that mesh owner's directory"
        row "$serial" - "$peer" "failed: certificate"
        return 1
    fi
    echo "$name" >"$issued/$peer.name"
    say "$peer $name"
}

# Free KiB under /data/local/tmp (toybox and GNU df both put "Available" third from the end).
free_kib() {
    on "$1" "df -k /data/local/tmp" | awk 'END { print $(NF - 2) }'
}

kib() { du -sk "$1" | cut -f1; }

deploy_one() {
    local serial=$1 state=$2 package=$3 package_id=$4 why abi
    why=$(unusable "$state")
    if [[ -n $why ]]; then problem "$serial" "$why"; row "$serial" - - "skipped: $state"; return 1; fi
    abi=$(on "$serial" getprop ro.product.cpu.abi)
    case $abi in
        arm64-v8a) ;;
        armeabi* | x86)
            problem "$serial" "a 32-bit phone (ABI ${abi}): llnode is built for 64-bit ARM (arm64-v8a) only, so it was skipped; use a 64-bit phone"
            row "$serial" - - "skipped: 32-bit ($abi)"
            return 1
            ;;
        *)
            problem "$serial" "ABI '${abi:-unknown}' has no llnode build (only arm64-v8a); skipped"
            row "$serial" - - "skipped: ABI ${abi:-unknown}"
            return 1
            ;;
    esac

    # Room for the binary, the model unless it is there already, and logs.
    local have_model need free
    have_model=$(on "$serial" "[ -x $remote/llnode ] && $remote/llnode model verify $remote/models/$(basename "$package") 2>/dev/null" || true)
    need=$(($(kib "$phone_bin") + 64 * 1024))
    [[ $have_model == "$package_id" ]] || need=$((need + $(kib "$package")))
    free=$(free_kib "$serial")
    if [[ ! $free =~ ^[0-9]+$ ]] || ((free < need)); then
        problem "$serial" "not enough storage: $((${free:-0} / 1024)) MiB free in /data/local/tmp, llnode needs $((need / 1024)) MiB; free some space on the phone, then re-run"
        row "$serial" - - "skipped: storage"
        return 1
    fi

    if stop_node "$serial"; then say "$serial: stopped the running node to upgrade it"; fi
    on "$serial" "mkdir -p $remote/models $remote/data"
    "$ADB" -s "$serial" push "$phone_bin" "$remote/llnode" >/dev/null
    on "$serial" "chmod 755 $remote/llnode"
    local version
    if ! version=$(on "$serial" "$remote/llnode --version 2>&1"); then
        problem "$serial" "the pushed binary does not run there ($version); rebuild with \`just android-build\` and re-run"
        row "$serial" - - "failed: binary"
        return 1
    fi
    if [[ $have_model != "$package_id" ]]; then
        say "$serial: pushing the model ($(du -sh "$package" | cut -f1))…"
        on "$serial" "rm -rf $remote/models/$(basename "$package")"
        "$ADB" -s "$serial" push "$package" "$remote/models/" >/dev/null
        have_model=$(on "$serial" "$remote/llnode model verify $remote/models/$(basename "$package") 2>&1" || true)
        if [[ $have_model != "$package_id" ]]; then
            problem "$serial" "the model arrived damaged ($have_model); re-run to push it again"
            row "$serial" - - "failed: model"
            return 1
        fi
    fi
    local who peer name
    who=$(provision "$serial")
    read -r peer name <<<"$who"
    start_node "$serial" "$package" "$name" "$peer"
    row "$serial" "$name" "$peer" "running ($version)"
}

cmd_deploy() {
    require_binaries
    local package package_id devices=() serial state failed=0 rc
    select_devices "$@"
    package=$(model_package)
    package_id=$("$host_bin" model verify "$package")
    owner_init
    for line in "${devices[@]}"; do
        read -r serial state <<<"$line"
        set +e
        (
            set -e
            deploy_one "$serial" "$state" "$package" "$package_id"
        )
        rc=$?
        set -e
        if ((rc != 0)); then
            failed=$((failed + 1))
            # A step without its own message failed: say so once.
            grep -q "^$serial " "$work/rows" || {
                problem "$serial" "deploying stopped at an unexpected failure (the lines above say which); re-run \`just android-deploy $serial\`"
                row "$serial" - - "failed"
            }
        fi
    done
    print_rows
    if ((failed == ${#devices[@]})); then
        fail "no device was deployed; fix what is said above and re-run \`just android-deploy\`"
    fi
    say "next: \`just android-status\` until a plan is shown, then \`just android-prompt \"Hello\"\`"
    ((failed == 0)) || exit 2
}

# "running (pid 4181); trusted peers connected: 1; plan epoch 2 with 2 stage(s)", or why not.
node_state() {
    local serial=$1 pid peers plan
    pid=$(node_pid "$serial")
    [[ -n $pid ]] || { say "stopped (\`just android-deploy $serial\` starts it)"; return; }
    peers=$(on "$serial" "$remote/llnode peers --json --data-dir $remote/data" 2>/dev/null |
        awk '/"state":/ { trusted = /"trusted"/ } /"connected": true/ && trusted { n++ } END { print n + 0 }')
    plan=$(on "$serial" "$remote/llnode plan --data-dir $remote/data" 2>/dev/null |
        awk '/^plan: epoch/ { sub(/,$/, "", $3); epoch = $3 } /^[0-9]+ / { stages++ }
             END { if (epoch != "") printf "plan epoch %s with %d stage(s)", epoch, stages; else print "no plan yet" }')
    say "running (pid $pid); trusted peers connected: $peers; $plan"
}

cmd_status() {
    local devices=() serial state why peer name
    select_devices "$@"
    for line in "${devices[@]}"; do
        read -r serial state <<<"$line"
        why=$(unusable "$state")
        if [[ -n $why ]]; then row "$serial" - - "$why"; continue; fi
        peer=$(on "$serial" "[ -f $remote/data/device.key ] && [ -x $remote/llnode ] && $remote/llnode id --data-dir $remote/data" || true)
        if [[ -z $peer ]]; then row "$serial" - - "not deployed (\`just android-deploy $serial\`)"; continue; fi
        name=$(cat "$issued/$peer.name" 2>/dev/null || echo "?")
        row "$serial" "$name" "$peer" "$(node_state "$serial")"
    done
    print_rows
}

cmd_logs() {
    local devices=() serial state why
    select_devices "$@"
    for line in "${devices[@]}"; do
        read -r serial state <<<"$line"
        say "== $serial"
        why=$(unusable "$state")
        if [[ -n $why ]]; then say "$why"; continue; fi
        on "$serial" "tail -n $log_lines $remote/node.log 2>/dev/null || echo 'no log: not deployed yet'"
    done
}

cmd_stop() {
    local devices=() serial state why
    select_devices "$@"
    for line in "${devices[@]}"; do
        read -r serial state <<<"$line"
        why=$(unusable "$state")
        if [[ -n $why ]]; then problem "$serial" "$why"; continue; fi
        if stop_node "$serial"; then say "$serial: stopped"; else say "$serial: no node was running"; fi
    done
}

cmd_prompt() {
    [[ $# -gt 0 ]] || fail "give the prompt text: \`just android-prompt \"Why is the sky blue?\"\`"
    local devices=() serial state text
    text=$(q "$*")
    if [[ -n ${ANDROID_SERIAL:-} ]]; then devices=("$ANDROID_SERIAL device"); else select_devices; fi
    for line in "${devices[@]}"; do
        read -r serial state <<<"$line"
        [[ $state == device && -n $(node_pid "$serial") ]] || continue
        echo "asking on $serial:" >&2
        "$ADB" -s "$serial" shell "$remote/llnode prompt --data-dir $remote/data ${LLNODE_ANDROID_PROMPT_ARGS:-} $text" </dev/null | tr -d '\r'
        return
    done
    fail "no device runs a node; start them with \`just android-deploy\`"
}

command=${1:-}
shift || true
case $command in
    deploy) cmd_deploy "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    prompt) cmd_prompt "$@" ;;
    *) fail "usage: deploy.sh deploy|status|logs|stop [SERIAL...] | prompt TEXT" ;;
esac
