#!/usr/bin/env bash
# Builds the policy components into policies/dist/ (run from anywhere; scripts/setup.sh runs it).
#   dist/<name>.wasm           the shipped policies (joint-limits, workspace-bounds, instruction-filter, rate-limit)
#   dist/fixtures/<name>.wasm  hostile fixtures for the appliance's containment tests (test-only)
# Guests are built for wasm32-unknown-unknown and made into components by ./componentize, so
# they import nothing but their world (vla:policy/host and the types); wasi-filesystem alone is
# built for wasm32-wasip2 (rustc links that component itself) so that it imports WASI on purpose.
# Quick when nothing changed: cargo is incremental and outputs are rewritten only when they change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export CARGO_TARGET_DIR="$(realpath -m "${CARGO_TARGET_DIR:-$here/target}")"
target_dir="$CARGO_TARGET_DIR"

shipped=(joint-limits workspace-bounds instruction-filter rate-limit)
fixtures=(spin memory-bomb deep-recursion panic oversized-output log-flood legacy-deny)

installed="$(rustup target list --installed)"
for target in wasm32-unknown-unknown wasm32-wasip2; do
    if ! grep -qx "$target" <<<"$installed"; then
        echo "policies: adding the $target Rust target"
        rustup target add "$target"
    fi
done

packages=()
for name in "${shipped[@]}" "${fixtures[@]}"; do packages+=(-p "$name"); done
cargo build -q --release --target wasm32-unknown-unknown "${packages[@]}"
cargo build -q --release --target wasm32-wasip2 -p wasi-filesystem
cargo build -q --release -p componentize

core="$target_dir/wasm32-unknown-unknown/release"
pairs=()
for name in "${shipped[@]}"; do pairs+=("$core/${name//-/_}.wasm" "dist/$name.wasm"); done
for name in "${fixtures[@]}"; do pairs+=("$core/${name//-/_}.wasm" "dist/fixtures/$name.wasm"); done
"$target_dir/release/componentize" "${pairs[@]}"

mkdir -p dist/fixtures
wasi="$target_dir/wasm32-wasip2/release/wasi_filesystem.wasm"
cmp -s "$wasi" dist/fixtures/wasi-filesystem.wasm || cp "$wasi" dist/fixtures/wasi-filesystem.wasm

sizes=()
for name in "${shipped[@]}"; do sizes+=("$name $(($(stat -c %s "dist/$name.wasm") / 1024)) KiB"); done
for name in "${fixtures[@]}" wasi-filesystem; do
    sizes+=("fixtures/$name $(($(stat -c %s "dist/fixtures/$name.wasm") / 1024)) KiB")
done
summary="$(printf '%s, ' "${sizes[@]}")"
echo "policies: built ${#sizes[@]} components in policies/dist: ${summary%, }"
