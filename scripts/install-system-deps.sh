#!/bin/sh
# Debian packages the stack and its tests need, installed only when missing:
#   scripts/install-system-deps.sh        everything `make test` needs: what `run` needs, Chromium, its driver
#                                          and CJK fonts (the page tests), kubectl (kustomize)
#   scripts/install-system-deps.sh run    what `make run` needs: nginx and its njs module, envsubst, curl,
#                                          Prometheus and mtail (the dashboard's data)
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
command -v mtail >/dev/null 2>&1 || missing="$missing mtail"
if [ "${1:-test}" != run ]; then
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
  # Chromium draws Chinese text only with a CJK font (screenshots of the pages show it).
  [ -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ] || missing="$missing fonts-noto-cjk"
  command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
fi
[ -n "$missing" ] || exit 0
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=sudo
else
  echo "missing Debian packages:$missing" >&2
  echo "install them as root (apt-get install$missing) and run again" >&2
  exit 1
fi
command -v apt-get >/dev/null 2>&1 || { echo "missing packages:$missing (no apt-get here: install them)" >&2; exit 1; }
echo "installing Debian packages:$missing"
$sudo apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
