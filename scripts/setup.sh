#!/usr/bin/env bash
# Installs what building, running and testing the appliance need. Idempotent: quick when done.
#   - Debian packages (only those missing): prometheus (server and promtool), protoc (build),
#     patchelf (scripts/package.sh), systemd-analyze (the unit's check), debootstrap, podman
#     and buildah (the .deb's and the image's tests)
#   - .venv with torch==2.11.0 from PyPI (libtorch for tch) and tritonclient (tests); see
#     requirements.txt
#   - .venv-clients with the robots' own clients (openpi-client; tests), see
#     requirements-clients.txt, and the project's client package (clients/python)
#   - the wasm32-unknown-unknown and wasm32-wasip2 Rust targets (policy crates)
#   - the policy components in policies/dist (policies/build.sh; incremental)
#   - the second demo model, tiny-pi, exported into models/build (models/export.py; again only
#     when its sources change)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# prometheus: the Prometheus server and promtool, for the monitoring tests (started by the
# tests themselves on ephemeral ports, never as a service). protobuf-compiler: protoc, which the
# appliance's build runs on proto/grpc_service.proto (OIP over gRPC). patchelf: the relocatable
# release's rpath (scripts/package.sh). systemd: systemd-analyze, which checks the shipped unit.
# debootstrap: the Debian root the .deb installs into and the image's base is made of. buildah:
# builds the image (images/Containerfile); podman: imports the base, inspects the image, and is
# what podman-compose (in .venv-clients) needs to validate images/compose.yaml. openssl: the
# test certificate for the Kubernetes ConfigMap's configuration. cmake, nasm: libjpeg-turbo,
# which the appliance's build compiles from the turbojpeg crate's source (nasm for its SIMD).
missing=()
for pkg in curl ca-certificates gcc g++ python3-venv prometheus tmux protobuf-compiler patchelf systemd \
    debootstrap podman buildah openssl cmake nasm; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python="${PYTHON:-python3}"
if ! .venv/bin/python - <<'PY' 2>/dev/null
import sys, tokenizers, torch, tritonclient.grpc, tritonclient.http, litserve, fastapi, uvicorn, PIL
sys.exit(0 if torch.__version__.split("+")[0] == "2.11.0" else 1)
PY
then
    echo "setup: installing .venv from scripts/requirements.txt (torch 2.11.0 is a few GB, once)"
    # About 5 GB installed; without pip's cache (which would keep a second copy of every
    # wheel) that is also about what the install needs. Say so before pip runs out of room.
    free_kb="$(df -Pk "$root" | awk 'NR == 2 { print $4 }')"
    if [ "${free_kb:-0}" -lt $((6 * 1024 * 1024)) ]; then
        echo "setup: only $((free_kb / 1024)) MiB free under $root; .venv needs about 6 GiB" >&2
    fi
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
    .venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q -r scripts/requirements.txt
fi

# The robots' own clients, apart from torch (see requirements-clients.txt), and the project's
# own Python client (clients/python), installed from the repository as a robot team would.
if ! .venv-clients/bin/python -c 'import openpi_client.websocket_client_policy, tritonclient.grpc, vla_client, kubernetes_validate, podman_compose' 2>/dev/null; then
    echo "setup: installing .venv-clients from scripts/requirements-clients.txt and clients/python"
    [ -x .venv-clients/bin/python ] || "$python" -m venv .venv-clients
    .venv-clients/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q -r scripts/requirements-clients.txt
    .venv-clients/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q ./clients/python
fi

installed_targets="$(rustup target list --installed)"
for target in wasm32-unknown-unknown wasm32-wasip2; do
    if ! grep -qx "$target" <<<"$installed_targets"; then
        echo "setup: adding the $target Rust target"
        rustup target add "$target"
    fi
done

echo "setup: building the policy components (policies/build.sh)"
policies/build.sh

# tiny-pi: trained tokenizer, AOTInductor package and TorchScript module, checked against
# PyTorch by the export itself (a minute or two, once).
stamp="$( (cat models/export.py models/tiny_pi.py scripts/requirements.txt; nproc) | sha256sum | cut -d' ' -f1)"
if [ "$(cat models/build/.source 2>/dev/null)" != "$stamp" ]; then
    echo "setup: exporting the tiny-pi demo model (models/export.py models/tiny_pi.py models/build)"
    rm -rf models/build
    .venv/bin/python models/export.py models/tiny_pi.py models/build
    echo "$stamp" > models/build/.source
fi
