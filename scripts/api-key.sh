#!/bin/sh
# API keys for the front door (QAIO_API_KEYS_FILE; docs/operations.md). The file holds one line per
# key, `<name>:sha256:<hex> [rate=<n>r/s|<n>r/m] [conn=<n>]`, never the key itself; nginx re-reads it
# on every request, so adding or revoking a key needs no restart.
#
#   scripts/api-key.sh add FILE NAME [rate=20r/s] [conn=8]   make a key, add its line to FILE, print the key
#   scripts/api-key.sh line NAME [rate=..] [conn=..] < KEY   the line of a key made elsewhere
#   scripts/api-key.sh revoke FILE NAME                       remove every line of NAME (all its keys)
#
# Several lines may share a name (rotation: add the new key, move clients, revoke the old one by
# editing its line away); their limits and usage are the name's.
set -eu

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

check_name() {
  printf '%s' "$1" | grep -Eqx '[A-Za-z0-9._-]{1,64}' \
    || { echo "a key name is 1-64 of A-Z a-z 0-9 . _ - (got '$1')" >&2; exit 2; }
}

check_fields() {
  for field in "$@"; do
    printf '%s' "$field" | grep -Eqx 'rate=[1-9][0-9]*r/[sm]|conn=[1-9][0-9]*' \
      || { echo "a field is rate=<n>r/s, rate=<n>r/m or conn=<n> (got '$field')" >&2; exit 2; }
  done
}

line() {  # name [fields...], the key on stdin
  name=$1
  shift
  key=$(cat)
  [ -n "$key" ] || { echo "no key on standard input" >&2; exit 2; }
  digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
  printf '%s:sha256:%s%s\n' "$name" "$digest" "${*:+ $*}"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  add)
    [ $# -ge 2 ] || usage
    file=$1 name=$2
    shift 2
    check_name "$name"
    check_fields "$@"
    # 32 random bytes, URL-safe base64: what the OpenAI SDK and curl send as they are.
    key="qaio-$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    printf '%s' "$key" | line "$name" "$@" >> "$file"
    printf '%s\n' "$key"
    ;;
  line)
    [ $# -ge 1 ] || usage
    name=$1
    shift
    check_name "$name"
    check_fields "$@"
    line "$name" "$@"
    ;;
  revoke)
    [ $# -eq 2 ] || usage
    check_name "$2"
    awk -F: -v n="$2" '$1 == n { found = 1 } END { exit !found }' "$1" || { echo "no key named $2 in $1" >&2; exit 1; }
    # In place, through a copy in the same directory: nginx reads either the old or the new file whole.
    tmp=$(mktemp "$(dirname "$1")/.api-keys.XXXXXX")
    awk -F: -v n="$2" '$1 != n' "$1" > "$tmp"
    chmod --reference="$1" "$tmp" 2>/dev/null || chmod 644 "$tmp"
    mv "$tmp" "$1"
    ;;
  *) usage ;;
esac
