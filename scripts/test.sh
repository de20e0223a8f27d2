#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds keywarden and runs every test suite: once in a normal build (build/), once under
# AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/). Installs missing packages first.
# Each test file is one meson test, run in parallel (one per core). Measured choices on a 2-core
# machine (docs/architecture.md, "Tests"): the normal build is a unity build (1.5 min against 2.2
# clean); the sanitizer build is not (so every file also compiles alone) and stays at -O0 (-O1
# took 3.7 min to build to save seconds of test time).
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
setup build -Dunity=on -Dunity_size=8
ninja -C build
meson test -C build --print-errorlogs

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/)"
# b_lundef=false: the sanitizer runtimes are not linked into the static library itself.
setup build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug -Dunity=off -Dbenches=false
ninja -C build-asan
meson test -C build-asan --print-errorlogs
