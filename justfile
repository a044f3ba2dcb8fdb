# Every recipe here is one CI or a person runs. `cargo install just` if needed.

# The main job: a 3-node mesh on localhost (three `llnode start` processes) answering a prompt with the built-in model.
demo:
    cargo run --release -p llnode -- demo

# The tests, as CI runs them (no Python needed).
test:
    cargo test --workspace

# The API docs of every crate, failing on a broken or private link (CI runs it).
doc:
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Recompute onnxruntime's outputs for every test model and compare with the committed ones.
ort-check:
    bash scripts/ort-check.sh

# Prefill and decode speed on the ~100M-parameter built-in model: llnode vs onnxruntime, one thread.
bench-run:
    bash scripts/bench-run.sh

# Regenerate the small GPT-2/Llama/Qwen2/BLOOM/Phi test exports (needs torch and optimum).
test-exports:
    python3 -m venv target/venv-exports
    target/venv-exports/bin/pip install -q -r scripts/requirements.txt
    target/venv-exports/bin/python scripts/make_test_exports.py

# Sampling: the time to pick one token from 32000 and 151936 logits (greedy, temperature, top-k, top-p), against sorting the vocabulary.
bench-sampler:
    cargo bench -p llnode-models --bench sampler

# Planner: MIP solve times and simulated speedups over the even/memory/compute splits; draws target/bench-plan.svg.
bench-plan:
    cargo bench -p llnode-planner

# Mesh: control and 4 KiB tensor round trips (p50, p99; back to back and after 20 ms idle) and tensor throughput between two nodes on loopback.
bench-mesh:
    cargo bench -p llnode-mesh --bench mesh

# Distributed inference on loopback meshes of 1-4 real nodes (`just bench-mesh-infer 4`: 1 and 4 only): first token, decode tokens/s, hops per token and their cost, concurrency, bytes per link, RSS; draws target/bench-mesh-infer.svg.
bench-mesh-infer *nodes:
    cargo bench -p llnode --bench mesh_infer -- {{nodes}}

# Balancing and failover on a 3-node loopback mesh: tokens/s with and without balancing after a 2x throttle, tokens until the move and until the pace recovers, seconds until the released node is re-profiled, kill -9 to the end of the stall; draws target/bench-balance.svg.
bench-balance:
    cargo bench -p llnode --bench balance

# Fuzz the wire decoders (nightly and cargo-fuzz: `cargo install cargo-fuzz`).
fuzz-mesh seconds="60":
    cd mesh/fuzz && cargo +nightly fuzz run decode -- -max_total_time={{seconds}}

# Android: the Rust targets, Debian's aarch64 cross compiler, qemu-user and adb (apt-get; sudo if not root).
android-setup:
    bash android-build/setup.sh

# Android: a static aarch64-unknown-linux-musl llnode for phones (and aarch64-linux-android with ANDROID_NDK_HOME set).
android-build:
    bash android-build/build.sh

# Android: push llnode and the model to every phone `adb devices` lists (or those named), provision, (re)start.
android-deploy *serials: android-build
    cargo build --release -p llnode
    bash android-build/deploy.sh deploy {{serials}}

# Android: each phone's name, peer id, node and plan.
android-status *serials:
    bash android-build/deploy.sh status {{serials}}

# Android: the end of each phone's node log.
android-logs *serials:
    bash android-build/deploy.sh logs {{serials}}

# Android: stop the nodes (keys, certificates and the model stay on the phones).
android-stop *serials:
    bash android-build/deploy.sh stop {{serials}}

# Android: ask the phones' mesh, on the first phone running a node.
android-prompt +text:
    bash android-build/deploy.sh prompt {{quote(text)}}

# Android without a phone, by emulation (qemu-user): aarch64 text == x86-64, a mixed mesh, deploy to fake-adb devices.
android-check:
    bash scripts/android-check.sh
