#!/usr/bin/env bash
# Builds the relocatable release: a self-contained tree that runs on a machine with no Rust,
# no venv and no checkout.
#
#   scripts/package.sh [--profile release|dev] [--bin-dir DIR] [--no-build] [--link] [OUT]
#
# OUT defaults to target/package; --bin-dir takes the binaries from DIR (default
# target/<profile>); --link hard-links the libraries instead of copying them (same file
# system only; they are never modified, so the venv's stay intact).
#
# OUT/vla-appliance/
#   bin/appliance, bin/vla-console   rpath $ORIGIN/../lib: nothing outside the tree is searched
#   lib/                             every shared library the binaries load from the venv:
#                                    libtorch and, with PyPI's torch 2.11 wheel (a CUDA 13 build),
#                                    its CUDA libraries: that tree serves on a GPU and falls back
#                                    to the CPU without one. A CPU-only tree (~1 GB instead of
#                                    ~4 GB) comes from a venv with PyTorch's CPU wheel
#                                    (torch==2.11.0+cpu, download.pytorch.org/whl/cpu).
#   policies/dist/*.wasm             the shipped policy components (not the test fixtures), where
#                                    the default configuration preloads them from: run from the
#                                    tree's root (the unit's WorkingDirectory)
#   etc/appliance.toml               the service's configuration (data in /var/lib/vla-appliance)
#   systemd/                         the hardened unit and the GPU drop-in
#   models/                          tiny-pi and tiny-pi-ts, the second demo, when exported
#   README.md, VERSION
# Copy the tree anywhere (the .deb puts it in /opt/vla-appliance) and run bin/appliance.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=release build=1 out="" bin="" link=0
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --bin-dir) bin="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --link) link=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) out="$1"; shift ;;
    esac
done
out="${out:-$root/target/package}"
case "$profile" in release) dir=release ;; dev) dir=debug ;; *) echo "package: --profile release|dev" >&2; exit 2 ;; esac
command -v patchelf >/dev/null || { echo "package: patchelf is missing (scripts/setup.sh installs it)" >&2; exit 1; }
if [ "$build" = 1 ]; then
    source "$root/scripts/env.sh"
    (cd "$root" && cargo build --profile "$profile" -p appliance -p vla-console --bins)
fi
bin="${bin:-$root/target/$dir}"
for b in appliance vla-console; do
    [ -x "$bin/$b" ] || { echo "package: $bin/$b is missing (build it, or drop --no-build)" >&2; exit 1; }
done

tree="$out/vla-appliance"
rm -rf "$tree"
mkdir -p "$tree/bin" "$tree/lib" "$tree/policies/dist" "$tree/etc" "$tree/systemd"
cp "$bin/appliance" "$bin/vla-console" "$tree/bin/"
# The shared libraries the appliance loads from outside the system's own directories (libtorch,
# c10, gomp, CUDA's, ... from the venv): every library of each directory they come from, so
# those loaded later with dlopen (cuDNN's engines, NVRTC) come too. In one directory they find
# each other through $ORIGIN, which torch's and NVIDIA's wheels put in each RPATH.
# A copy's RPATH becomes $ORIGIN alone (the wheels' $ORIGIN/../../nvidia/... would point
# outside the tree); a hard link is left as it is, never modified, since it is the venv's file.
place() {
    if [ "$link" = 1 ] && ln -f "$1" "$2" 2>/dev/null; then return; fi
    cp "$1" "$2"
    if [ -n "$(patchelf --print-rpath "$2" 2>/dev/null)" ]; then patchelf --set-rpath '$ORIGIN' "$2"; fi
}
# Resolved by the build's rpath alone (env -i: no LD_LIBRARY_PATH of the caller's).
libdirs="$(env -i ldd "$tree/bin/appliance" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' \
    | { grep -vE '^/(usr/)?lib(64)?/' || true; } | xargs -r -n1 dirname | sort -u)"
[ -n "$libdirs" ] || { echo "package: the appliance loads no library from the venv: is it built against it?" >&2; exit 1; }
echo "$libdirs" | while read -r from; do
    for lib in "$from"/*.so*; do
        [ -f "$lib" ] || continue
        name="$(basename "$lib")"
        [ -e "$tree/lib/$name" ] || place "$(readlink -f "$lib")" "$tree/lib/$name"
    done
done
# The binaries are copies: their rpath (the build's venv) becomes the tree's own lib/.
for b in appliance vla-console; do
    patchelf --set-rpath '$ORIGIN/../lib' "$tree/bin/$b"
done
# Nothing of the build machine may remain: the binaries resolve everything from the tree.
missing="$(env -i LD_LIBRARY_PATH= ldd "$tree/bin/appliance" | grep 'not found' || true)"
[ -z "$missing" ] || { echo "package: unresolved libraries: $missing" >&2; exit 1; }
for p in joint-limits workspace-bounds instruction-filter rate-limit; do
    cp "$root/policies/dist/$p.wasm" "$tree/policies/dist/"
done
cp "$root/images/appliance.toml" "$tree/etc/appliance.toml"
cp "$root/images/systemd/vla-appliance.service" "$root/images/systemd/gpu.conf" "$tree/systemd/"
for m in tiny-pi tiny-pi-ts; do
    if [ -f "$root/models/build/$m/model.toml" ]; then
        mkdir -p "$tree/models/$m"
        cp "$root"/models/build/$m/model.* "$root/models/build/$m/tokenizer.json" "$tree/models/$m/"
    fi
done
version="$("$tree/bin/appliance" --version | awk '{ print $2 }')"
echo "$version" > "$tree/VERSION"
cat > "$tree/README.md" <<README
# vla-appliance $version

The relocatable release of the edge inference appliance (built by scripts/package.sh).

    cd /opt/vla-appliance                         # (wherever the tree is)
    bin/appliance --config etc/appliance.toml     # serve (HTTPS on 8443, data in data.dir)
    bin/appliance --config etc/appliance.toml health   # ask the running appliance for /health
    bin/vla-console --help                        # the operator console

bin/ finds its libraries in lib/ (rpath \$ORIGIN/../lib); copy the tree anywhere.
systemd/vla-appliance.service expects it in /opt/vla-appliance, the configuration in
/etc/vla-appliance/appliance.toml and a vla-appliance user (README, Deploy, says how).
policies/dist/ holds the shipped policy components; the default configuration preloads them
from there relative to the working directory, so start the appliance from the tree's root.
README
echo "package: $tree ($(du -sh "$tree" | cut -f1), appliance $version)"
