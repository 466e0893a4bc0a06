#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (warnings are errors) and the whole test suite.
# Installs what is missing first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The policy guests' own unit tests (their workspace is outside the host's build graph).
(cd policies && cargo test -p guest-util -p joint-limits -p workspace-bounds -p instruction-filter -p rate-limit)
