#!/usr/bin/env bash
# Build and install CRIU >= 4.2 as /usr/local/sbin/criu, once (idempotent).
#
# Why: Debian 12's criu 3.17 fails `criu check` on recent kernels ("vdso: Unexpected
# rt vDSO area bounds", fixed upstream in 4.1); 4.1 cannot dump a process holding any
# TCP or UDP socket on Linux >= 6.16 ("sockets: Can't get 1:16 opt: Operation not
# supported", CRIU issues #2705, #2718: fixed in 4.2) and runs action scripts twice
# under runtimes (runc, podman); newer Debian binary packages need a newer glibc. The upstream tarball from Debian's source archive builds against
# bookworm's libraries in well under a minute (see the shared notes, criu.md).
#
# Steps: skip when a CRIU >= 4.1 that passes `criu check` is already there; install
# the build dependencies from the machine's own suite; fetch only the upstream
# tarball (`apt-get source --download-only --tar-only`, verified by apt against the
# signed Sources index) through a private sources list pointing at the SAME Debian
# mirror the machine already uses (read from apt's configuration: no host name is
# written here, and the system's apt sources are left untouched); build; install.
#
# Environment: CRIU (a binary to try first), CRIU_PREFIX (default /usr/local),
# CRIU_SOURCE_SUITE (default sid: trixie has 4.1.1), CRIU_BUILD_DIR (default: a temporary directory).
set -euo pipefail

PREFIX=${CRIU_PREFIX:-/usr/local}
MIN_VERSION=4.2
SUITE=${CRIU_SOURCE_SUITE:-sid}
BUILD_DEPS=(build-essential pkgconf protobuf-c-compiler protobuf-compiler libprotobuf-dev libprotobuf-c-dev
  libnl-3-dev libcap-dev libnet1-dev libnftables-dev libgnutls28-dev libbsd-dev uuid-dev xz-utils)

say() { echo "setup-criu: $*" >&2; }

criu_version() { "$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1; }

# A CRIU binary that is new enough and passes `criu check` on this kernel.
criu_works() {
  local bin=$1 version
  [ -n "$bin" ] && [ -x "$bin" ] || return 1
  version=$(criu_version "$bin")
  [ -n "$version" ] && dpkg --compare-versions "$version" ge "$MIN_VERSION" || return 1
  "$bin" check >/dev/null 2>&1
}

for candidate in "${CRIU:-}" "$PREFIX/sbin/criu" "$(command -v criu || true)"; do
  if criu_works "$candidate"; then
    say "CRIU $(criu_version "$candidate") at $candidate passes 'criu check': nothing to do"
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  say "no working CRIU >= $MIN_VERSION; building one needs root (run: sudo $0)"
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing build dependencies: ${missing[*]}"
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# The Debian archive this machine already uses: the repository whose label is
# "Debian" and whose release is this system's codename (not -security/-updates).
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mirror=$(apt-get indextargets --format '$(LABEL) $(RELEASE) $(REPO_URI)' 2>/dev/null |
  awk -v rel="$codename" '$1 == "Debian" && $2 == rel { print $3; exit }')
if [ -z "$mirror" ]; then
  say "cannot find the Debian mirror for '$codename' in apt's configuration (apt-get indextargets); run apt-get update"
  exit 1
fi

work=${CRIU_BUILD_DIR:-$(mktemp -d /var/tmp/snapcore-criu.XXXXXX)}
mkdir -p "$work"
chmod 755 "$work" # apt downloads as the unprivileged _apt user
[ -n "${CRIU_BUILD_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
apt_dir=$work/apt
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed_by=""
[ -f "$keyring" ] && signed_by="[signed-by=$keyring] "
echo "deb-src ${signed_by}${mirror} ${SUITE} main" >"$apt_dir/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "Debug::NoLocking=1")

say "fetching the CRIU source tarball from $mirror ($SUITE)"
apt-get -qq "${apt_private[@]}" update
(cd "$work" && apt-get -qq "${apt_private[@]}" source --download-only --tar-only criu)
tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | head -n1)
if [ -z "$tarball" ]; then
  say "apt-get source did not fetch criu_*.orig.tar.* into $work"
  exit 1
fi
src=$work/src
rm -rf "$src" && mkdir -p "$src"
tar -xf "$tarball" -C "$src" --strip-components=1

say "building $(basename "$tarball")"
make -s -C "$src" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
  tail -n 30 "$work/build.log" >&2
  say "build failed (log above)"
  exit 1
}
make -s -C "$src" install-criu PREFIX="$PREFIX" >>"$work/build.log" 2>&1

if ! criu_works "$PREFIX/sbin/criu"; then
  "$PREFIX/sbin/criu" check >&2 || true
  say "$PREFIX/sbin/criu was installed but fails 'criu check' (output above)"
  exit 1
fi
say "installed CRIU $(criu_version "$PREFIX/sbin/criu") as $PREFIX/sbin/criu"
