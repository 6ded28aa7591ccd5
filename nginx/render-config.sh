#!/bin/sh
# Render the nginx configuration for a local nginx into PREFIX (default: run/nginx):
#   PREFIX/nginx.conf and PREFIX/conf.d/*, from the same templates and qaio-env.envsh that the
#   official nginx image uses in compose and Kubernetes. Start it with:
#   nginx -p PREFIX -c PREFIX/nginx.conf
set -eu
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-$here/../run/nginx}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

export QAIO_NGINX_PREFIX="$prefix"
: "${QAIO_NGINX_CONF_DIR:=$prefix/conf.d}"
: "${QAIO_NGINX_CACHE_DIR:=$prefix/cache}"
: "${QAIO_NGINX_HTML_DIR:=$here/html}"
: "${QAIO_NGINX_ACCESS_LOG:=$prefix/logs/access.log}"
: "${QAIO_NGINX_MIME_TYPES:=/etc/nginx/mime.types}"
export QAIO_NGINX_CONF_DIR QAIO_NGINX_CACHE_DIR QAIO_NGINX_HTML_DIR QAIO_NGINX_ACCESS_LOG QAIO_NGINX_MIME_TYPES
. "$here/qaio-env.envsh"

# nginx started as root hands its workers to an unprivileged user, who must own the writable dirs.
if [ "$(id -u)" = 0 ]; then
  QAIO_NGINX_USER_LINE="user nobody $(id -gn nobody);"
else
  QAIO_NGINX_USER_LINE="# not started as root: workers keep this user"
fi
export QAIO_NGINX_USER_LINE

mkdir -p "$QAIO_NGINX_CONF_DIR" "$QAIO_NGINX_CACHE_DIR" "$prefix/logs" "$prefix/tmp"
# Only QAIO_NGINX_* variables are substituted; nginx's own $variables stay as they are.
vars=$(env | sed -n 's/^\(QAIO_NGINX_[A-Z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in "$here"/templates/*.template; do
  name=$(basename "$template" .template)
  envsubst "$vars" < "$template" > "$QAIO_NGINX_CONF_DIR/$name"
done
envsubst "$vars" < "$here/local/nginx.conf.template" > "$prefix/nginx.conf"
if [ "$(id -u)" = 0 ]; then
  chmod a+x "$prefix"
  chown -R nobody "$QAIO_NGINX_CACHE_DIR" "$prefix/tmp"
fi
echo "$prefix/nginx.conf"
