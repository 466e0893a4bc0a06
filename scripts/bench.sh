#!/usr/bin/env bash
# Runs the standard benchmark suite (a few minutes on 2 cores) and writes bench/results/:
# report.md, report.json, the charts (SVG) and the appliance's logs. Extra arguments go to
# `bench suite` (e.g. `--device cuda:0`, `--sweep 1,8,64`, `--out DIR`). Installs what is
# missing first. The criterion micro-benchmarks: `cargo bench -p bench --bench micro`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release -p bench
exec "$root/target/release/bench" suite "$@"
