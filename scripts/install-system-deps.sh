#!/bin/sh
# Debian packages the stack and its tests need, installed only when missing:
#   scripts/install-system-deps.sh        everything `make test` needs: what `run` needs, Chromium, its driver
#                                          and CJK fonts (the page tests), kubectl (kustomize), g++ (the int8 kernel)
#   scripts/install-system-deps.sh run    what `make run` needs: nginx and its njs module, envsubst, curl,
#                                          Prometheus and mtail 3.0.5 or later (the dashboard's data)
# Installs as root, or through sudo when it works without a password prompt; otherwise prints one
# message naming the packages to install and fails.
set -eu
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
# njs, for API keys at the front door (QAIO_API_KEYS_FILE)
[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || missing="$missing libnginx-mod-http-js"
command -v envsubst >/dev/null 2>&1 || missing="$missing gettext-base"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
# mtail before 3.0.5 (Debian 12 has 3.0.0~rc50) reads one datagram of its UDP log stream per 250 ms
# poll: past 4 requests/s the front door's counters fall behind, then lose what the socket cannot hold.
MTAIL_MIN=3.0.5
mtail_version() { mtail --version 2>/dev/null | awk '{print $3; exit}'; }
mtail_ok() { command -v mtail >/dev/null 2>&1 && { ! command -v dpkg >/dev/null 2>&1 ||
  dpkg --compare-versions "$(mtail_version)" ge "$MTAIL_MIN"; }; }
mtail_ok || missing="$missing mtail"
if [ "${1:-test}" != run ]; then
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
  # Chromium draws Chinese text only with a CJK font (screenshots of the pages show it).
  [ -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || missing="$missing fonts-noto-cjk"
  command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
  # The int8 kernel's tests build it from source (make run needs no compiler: int8 then runs on torch's).
  command -v c++ >/dev/null 2>&1 || missing="$missing g++"
fi
[ -n "$missing" ] || exit 0
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=sudo
else
  echo "missing Debian packages:$missing" >&2
  echo "install them as root (apt-get install$missing; mtail $MTAIL_MIN or later) and run again" >&2
  exit 1
fi
command -v apt-get >/dev/null 2>&1 || { echo "missing packages:$missing (no apt-get here: install them)" >&2; exit 1; }
echo "installing Debian packages:$missing"
$sudo apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
mtail_ok && exit 0
# This release's mtail is too old: Debian 13's (a Go binary needing only libc), fetched by an apt of
# its own (scripts/apt-download.sh), so nothing of this system's apt configuration changes.
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
chmod 755 "$debs"  # apt downloads as _apt
echo "installing mtail from Debian 13 (this release's is older than $MTAIL_MIN)"
$sudo "$(dirname "$0")/apt-download.sh" trixie "$debs" mtail
DEBIAN_FRONTEND=noninteractive $sudo dpkg -i "$debs"/mtail_*.deb >/dev/null
mtail_ok || { echo "mtail $(mtail_version) is still older than $MTAIL_MIN" >&2; exit 1; }
