#!/usr/bin/env bash
# Builds the Debian package from the relocatable release tree (scripts/package.sh):
#
#   scripts/deb.sh [--tree DIR] [--compress zstd|xz|none] [OUT]
#
# --tree takes an existing tree (default: build one with scripts/package.sh); OUT defaults to
# target/package. Writes OUT/vla-appliance_<version>_<arch>.deb, which installs:
#   /opt/vla-appliance/                       the tree (binaries, libraries, policies)
#   /etc/vla-appliance/appliance.toml         the service's configuration (a conffile: an
#                                             upgrade keeps the operator's edits)
#   /lib/systemd/system/vla-appliance.service the hardened unit (systemd/gpu.conf, the GPU
#                                             drop-in, stays in the tree to copy)
# postinst creates the vla-appliance system user and /var/lib/vla-appliance, enables and starts
# the unit on a first install where systemd runs (an upgrade restarts it if it runs, never
# waiting for the warm-up), and says where the token, key and certificate will be. Upgrades
# and `apt remove` keep /var/lib/vla-appliance (robots, policies, audit, quotas, certificates);
# `apt purge` deletes it and /etc/vla-appliance. The user stays (Debian's rule for system
# users: files elsewhere may still be owned by it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="" compress=zstd out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tree) tree="$2"; shift 2 ;;
        --compress) compress="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) out="$1"; shift ;;
    esac
done
out="${out:-$root/target/package}"
command -v dpkg-deb >/dev/null || { echo "deb: dpkg-deb is missing (Debian's dpkg)" >&2; exit 1; }
if [ -z "$tree" ]; then
    "$root/scripts/package.sh" "$out"
    tree="$out/vla-appliance"
fi
[ -x "$tree/bin/appliance" ] || { echo "deb: $tree is not a release tree (scripts/package.sh)" >&2; exit 1; }
version="$(cat "$tree/VERSION")"
arch="$(dpkg --print-architecture)"
mkdir -p "$out"
stage="$(mktemp -d "$out/deb-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/DEBIAN" "$stage/opt" "$stage/etc/vla-appliance" "$stage/lib/systemd/system"
# Hard links where the tree is on the same file system: the package is written from them.
cp -al "$tree" "$stage/opt/vla-appliance" 2>/dev/null \
    || { rm -rf "$stage/opt/vla-appliance" && cp -a "$tree" "$stage/opt/vla-appliance"; }
cp "$tree/etc/appliance.toml" "$stage/etc/vla-appliance/appliance.toml"
cp "$tree/systemd/vla-appliance.service" "$stage/lib/systemd/system/vla-appliance.service"

cat > "$stage/DEBIAN/control" <<CONTROL
Package: vla-appliance
Version: $version
Architecture: $arch
Maintainer: VLA appliance team <vla-appliance@example.com>
Section: misc
Priority: optional
Depends: libc6 (>= 2.36), libstdc++6, libgcc-s1, passwd
Installed-Size: $(du -sk "$stage/opt" | cut -f1)
Homepage: https://example.com/vla-appliance
Description: edge inference appliance for robot cells
 Serves vision-language-action models (libtorch, GPU or CPU) to the robots of a
 cell over HTTPS, with WebAssembly safety and rate-limit policies, durable quotas,
 a Prometheus metrics catalogue and an operator console (vla-console).
CONTROL
echo "/etc/vla-appliance/appliance.toml" > "$stage/DEBIAN/conffiles"

cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent group vla-appliance >/dev/null; then
        groupadd --system vla-appliance
    fi
    if ! getent passwd vla-appliance >/dev/null; then
        useradd --system --gid vla-appliance --home-dir /var/lib/vla-appliance --no-create-home \
            --shell /usr/sbin/nologin --comment "VLA edge inference appliance" vla-appliance
    fi
    # Kept on upgrade and removal; the group (the cell's Prometheus) may enter it.
    install -d -o vla-appliance -g vla-appliance -m 0750 /var/lib/vla-appliance
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        if [ -z "$2" ]; then
            # A first install: enabled and started. An upgrade ($2, the old version) keeps the
            # admin's choice and restarts it only if it runs.
            systemctl enable vla-appliance.service >/dev/null || true
            systemctl --no-block start vla-appliance.service || true
        else
            systemctl --no-block try-restart vla-appliance.service || true
        fi
    fi
    cat <<MESSAGE
vla-appliance: configuration /etc/vla-appliance/appliance.toml, data /var/lib/vla-appliance.
  The first start writes the admin token to /var/lib/vla-appliance/admin.token, the demo robot's
  key to /var/lib/vla-appliance/demo-robot.key and the certificate to
  /var/lib/vla-appliance/tls/cert.pem; `journalctl -u vla-appliance` shows where, with the
  certificate's SHA-256 fingerprint. Check it with:
    sudo -u vla-appliance /opt/vla-appliance/bin/appliance --config /etc/vla-appliance/appliance.toml health
  A GPU cell adds the drop-in /opt/vla-appliance/systemd/gpu.conf (README, Deploy).
MESSAGE
fi
POSTINST

cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl disable --now vla-appliance.service >/dev/null || true
fi
PRERM

cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
case "$1" in
    purge)
        # The robot registry, policies, audit log, quotas, certificates and tokens.
        rm -rf /var/lib/vla-appliance /etc/vla-appliance
        ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

deb="$out/vla-appliance_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$stage" "$deb" >/dev/null
echo "deb: $deb ($(du -h "$deb" | cut -f1))"
