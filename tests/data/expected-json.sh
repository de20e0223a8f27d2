#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Sourced by the golden-file scripts: write_expected KW OUT writes OUT with every key version's
# material as `keywarden read` gives it, for the store that KEYWARDEN_KEYSTORE names.
write_expected() {
  local kw=$1 out=$2
{
  echo '{'
  first=1
  while IFS=$'\t' read -r id version state; do
    [ $first = 1 ] || echo ','
    first=0
    if [ "$state" = destroyed ]; then priv=null; else
      priv="\"$("$kw" read "$id" --private --version "$version")\""
    fi
    pub=null
    case "$id" in */storage|poison/keypair) pub="\"$("$kw" read "$id" --public --version "$version")\"";; esac
    printf '  "%s@%s": {"state": "%s", "private": %s, "public": %s}' "$id" "$version" "$state" "$priv" "$pub"
  done < <("$kw" list --rotated --json | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    for v in r["versions"]:
        print(r["key_id"], v["version"], v["state"], sep="\t")')
  echo
  echo '}'
} > "$out"
}
