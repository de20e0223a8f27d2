#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds keywarden and runs every test suite: once in a normal build (build/), once under
# AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/). Installs missing packages first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

setup() {  # setup DIR [meson args...]
  local dir=$1; shift
  if [ -f "$dir/build.ninja" ]; then
    meson setup --reconfigure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@" >/dev/null
  fi
}

echo "== normal build (build/)"
setup build
ninja -C build
meson test -C build --print-errorlogs

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/)"
# b_lundef=false: the sanitizer runtimes are not linked into the static library itself.
setup build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug
ninja -C build-asan
meson test -C build-asan --print-errorlogs
