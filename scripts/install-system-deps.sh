#!/usr/bin/env bash
# Install the Debian packages the liftrec test suite needs, when they are missing.
#
# Idempotent and quick when everything is present: each package is checked with
# dpkg-query first; `apt-get update` runs at most once, and only when something
# has to be installed. Runs as root (CI), through sudo when not root and sudo is
# available, and fails loudly otherwise.
#
# Usage: scripts/install-system-deps.sh [--check]
#   --check   only report what is missing; exit 1 if anything is.
#
# Packages (Debian name -> why):
#   docker-compose   validates docker-compose.yml (tests/integration/test_compose.py)
set -euo pipefail

PACKAGES=(
    docker-compose
)

say() { printf 'install-system-deps: %s\n' "$*"; }
die() { printf 'install-system-deps: ERROR: %s\n' "$*" >&2; exit 1; }

check_only=0
case "${1:-}" in
    "") ;;
    --check) check_only=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'; expected nothing or --check" ;;
esac

is_installed() {
    # "install ok installed" is dpkg's state for a fully configured package.
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

command -v dpkg-query >/dev/null 2>&1 \
    || die "dpkg-query not found: this script supports Debian/Ubuntu only; install ${PACKAGES[*]} by hand"

missing=()
for pkg in "${PACKAGES[@]}"; do
    if is_installed "$pkg"; then
        say "ok: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "nothing to do (${#PACKAGES[@]} package(s) present)"
    exit 0
fi

if [ "$check_only" -eq 1 ]; then
    say "missing: ${missing[*]}"
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    die "need root to install ${missing[*]}: run as root or with passwordless sudo"
fi

export DEBIAN_FRONTEND=noninteractive
say "missing: ${missing[*]}"
say "running: ${SUDO[*]:+${SUDO[*]} }apt-get update"
"${SUDO[@]}" apt-get update -q || die "apt-get update failed"
say "running: ${SUDO[*]:+${SUDO[*]} }apt-get install -y --no-install-recommends ${missing[*]}"
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"

for pkg in "${missing[@]}"; do
    is_installed "$pkg" || die "$pkg is still not installed after apt-get install"
done
say "installed: ${missing[*]}"
