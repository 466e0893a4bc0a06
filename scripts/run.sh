#!/usr/bin/env bash
# Starts the appliance with its embedded defaults: HTTPS on 0.0.0.0:8443, a self-signed
# certificate and the generated demo model under ./data. Extra arguments go to the appliance
# (e.g. `--config appliance.toml`). Installs what is missing first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release -p appliance
exec "$root/target/release/appliance" "$@"
