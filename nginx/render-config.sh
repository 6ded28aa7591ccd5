#!/bin/sh
# Render the nginx configuration for a local nginx into PREFIX (default: run/nginx):
#   PREFIX/nginx.conf and PREFIX/conf.d/*, from the same templates and qaio-env.envsh that the
#   official nginx image uses in compose and Kubernetes. Start it with:
#   nginx -p PREFIX -c PREFIX/nginx.conf
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-$here/../run/nginx}
mkdir -p "$prefix"
chmod a+x "$prefix"
prefix=$(cd "$prefix" && pwd)

export QAIO_NGINX_PREFIX="$prefix"
: "${QAIO_NGINX_CONF_DIR:=$prefix/conf.d}"
: "${QAIO_NGINX_CACHE_DIR:=$prefix/cache}"
: "${QAIO_NGINX_HTML_DIR:=$here/html}"
: "${QAIO_NGINX_ACCESS_LOG:=$prefix/logs/access.log}"
: "${QAIO_NGINX_MIME_TYPES:=/etc/nginx/mime.types}"
: "${QAIO_NGINX_NJS_DIR:=$here/njs}"
# nginx reads the keys file from its workers: a relative path would be read from its prefix.
if [ -n "${QAIO_API_KEYS_FILE:-}" ] && [ -d "$(dirname "$QAIO_API_KEYS_FILE")" ]; then
  QAIO_API_KEYS_FILE="$(cd "$(dirname "$QAIO_API_KEYS_FILE")" && pwd)/$(basename "$QAIO_API_KEYS_FILE")"
  export QAIO_API_KEYS_FILE
fi
export QAIO_NGINX_CONF_DIR QAIO_NGINX_CACHE_DIR QAIO_NGINX_HTML_DIR QAIO_NGINX_ACCESS_LOG QAIO_NGINX_MIME_TYPES \
  QAIO_NGINX_NJS_DIR
. "$here/qaio-env.envsh"

# API keys are checked by njs (Debian: libnginx-mod-http-js), loaded only when they are on; the
# official image loads it in its own nginx.conf (nginx/Dockerfile).
QAIO_NGINX_MODULES_LINE="# no dynamic modules (API keys off)"
if [ -n "$QAIO_API_KEYS_FILE" ]; then
  for module in /usr/lib/nginx/modules/ngx_http_js_module.so /etc/nginx/modules/ngx_http_js_module.so; do
    [ -e "$module" ] && QAIO_NGINX_MODULES_LINE="load_module $module;" && break
  done
  if [ "$QAIO_NGINX_MODULES_LINE" = "# no dynamic modules (API keys off)" ]; then
    echo "API keys (QAIO_API_KEYS_FILE) need nginx's njs module: apt-get install libnginx-mod-http-js" >&2
    exit 1
  fi
fi
export QAIO_NGINX_MODULES_LINE

# Every directory from / down to $1 lets others through (o+x).
world_reachable() {
  dir=$1
  while [ "$dir" != "/" ]; do
    [ -n "$(find "$dir" -maxdepth 0 -perm -o+x 2>/dev/null)" ] || return 1
    dir=$(dirname "$dir")
  done
}

# nginx started as root hands its workers to nobody, who must reach the prefix and the web page. A
# checkout under a private home (/root is 0700) cannot give that: the workers then stay root.
if [ "$(id -u)" != 0 ]; then
  QAIO_NGINX_USER_LINE="# not started as root: workers keep this user"
  nginx_user=""
elif world_reachable "$prefix" && world_reachable "$QAIO_NGINX_HTML_DIR"; then
  QAIO_NGINX_USER_LINE="user nobody $(id -gn nobody);"
  nginx_user=nobody
else
  echo "note: nobody cannot reach $prefix or $QAIO_NGINX_HTML_DIR; nginx workers run as root" >&2
  QAIO_NGINX_USER_LINE="user root;"
  nginx_user=""
fi
export QAIO_NGINX_USER_LINE
if [ -n "$QAIO_API_KEYS_FILE" ] && [ "$nginx_user" = nobody ]; then
  if ! world_reachable "$(dirname "$QAIO_API_KEYS_FILE")" \
      || [ -z "$(find "$QAIO_API_KEYS_FILE" -maxdepth 0 -perm -o+r 2>/dev/null)" ]; then
    echo "nginx's workers (nobody) cannot read QAIO_API_KEYS_FILE ($QAIO_API_KEYS_FILE): every key would be refused" >&2
    exit 1
  fi
fi

mkdir -p "$QAIO_NGINX_CONF_DIR" "$QAIO_NGINX_CACHE_DIR" "$prefix/logs" "$prefix/tmp"
# Only QAIO_NGINX_* variables are substituted; nginx's own $variables stay as they are.
vars=$(env | sed -n 's/^\(QAIO_NGINX_[A-Z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in "$here"/templates/*.template; do
  name=$(basename "$template" .template)
  envsubst "$vars" < "$template" > "$QAIO_NGINX_CONF_DIR/$name"
done
envsubst "$vars" < "$here/local/nginx.conf.template" > "$prefix/nginx.conf"
if [ -n "$nginx_user" ]; then
  chown -R "$nginx_user" "$QAIO_NGINX_CACHE_DIR" "$prefix/tmp"
fi
echo "$prefix/nginx.conf"
