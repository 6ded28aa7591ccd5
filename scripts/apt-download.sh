#!/bin/sh
# Download Debian packages of another release into DIR, with an apt of its own (its own source list,
# state and cache in a temporary directory), so nothing of this system's apt configuration changes:
#   scripts/apt-download.sh SUITE DIR PACKAGE...     e.g. trixie /tmp/debs mtail
set -eu
suite=$1
dest=$2
shift 2
apt_dir=$(mktemp -d)
trap 'rm -rf "$apt_dir"' EXIT
chmod 755 "$apt_dir"  # apt downloads as _apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/parts" "$apt_dir/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
packages=$*
set -- -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts="$apt_dir/parts" \
  -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir" -o Dir::Cache::archives="$apt_dir/archives"
apt-get "$@" update -qq
# shellcheck disable=SC2086 # one word per package
(cd "$dest" && apt-get "$@" download $packages >/dev/null 2>&1)
