#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian 12 packages keywarden needs to build and test.
# Does nothing when they are all present. Not root: prints the command instead.
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config
  libssl-dev openssl
  libp11-kit-dev p11-kit
  libcli11-dev catch2 nlohmann-json3-dev
  softhsm2 opensc
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

cmd=(apt-get install -y --no-install-recommends "${missing[@]}")
if [ "$(id -u)" -ne 0 ]; then
  echo "keywarden needs these packages: ${missing[*]}" >&2
  echo "run as root: apt-get update && ${cmd[*]}" >&2
  exit 1
fi

echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists; an old list may name versions that are gone.
apt-get update -qq
"${cmd[@]}"
