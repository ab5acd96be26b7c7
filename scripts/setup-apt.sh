#!/usr/bin/env bash
# Install the Debian packages snapcore and its tests need, once (idempotent).
# Each plugin may list more in plugins/NAME/apt-packages.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-dev util-linux e2fsprogs xfsprogs btrfs-progs rsync tar zstd acl attr
  runc podman busybox-static etcd-server etcd-client zsh)  # the container, cluster and completion tests (--no-install-recommends: not Debian's CRIU 3.17)
for f in plugins/*/apt-packages.txt; do
  [ -f "$f" ] || continue
  while read -r pkg _; do
    case "$pkg" in ''|'#'*) ;; *) packages+=("$pkg") ;; esac
  done < "$f"
done

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
