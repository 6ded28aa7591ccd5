#!/bin/sh
# An nginx with `resolve` on upstream servers (1.27.3 or later, as in the nginx image that compose and
# Kubernetes run), for the test of re-resolved worker addresses: Debian 12's nginx is 1.22. Debian
# unstable's nginx package and the libraries it links, its C library and loader among them, unpacked
# into PREFIX (default build/nginx) and started through that loader by PREFIX/nginx, so nothing of this
# system changes (scripts/apt-download.sh: an apt with a source list and state of its own). Does
# nothing when it is there.
#   scripts/fetch-nginx.sh [PREFIX]     prints the path of the nginx to run
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/build/nginx}
NGINX_MIN=1.27.3
if [ -x "$prefix/nginx" ] && dpkg --compare-versions "$("$prefix/nginx" -v 2>&1 | sed 's|.*nginx/||')" ge "$NGINX_MIN"; then
  echo "$prefix/nginx"
  exit 0
fi
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
chmod 755 "$debs"  # apt downloads as _apt
echo "fetching Debian unstable's nginx into $prefix (this system's is older than $NGINX_MIN)" >&2
"$here/scripts/apt-download.sh" sid "$debs" nginx libssl3t64 libpcre2-8-0 zlib1g libcrypt1 libc6
rm -rf "$prefix"
mkdir -p "$prefix/root"
for deb in "$debs"/*.deb; do
  dpkg-deb -x "$deb" "$prefix/root"
done
cat >"$prefix/nginx" <<'WRAPPER'
#!/bin/sh
# Debian unstable's nginx, with the libraries it came with (scripts/fetch-nginx.sh).
root=$(cd "$(dirname "$0")" && pwd)/root
exec "$root/usr/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" "$root/usr/sbin/nginx" "$@"
WRAPPER
chmod 755 "$prefix/nginx"
version=$("$prefix/nginx" -v 2>&1 | sed 's|.*nginx/||')
dpkg --compare-versions "$version" ge "$NGINX_MIN" || { echo "Debian unstable's nginx is $version" >&2; exit 1; }
echo "$prefix/nginx"
