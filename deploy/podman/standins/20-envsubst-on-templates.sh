#!/bin/sh
# Render /etc/nginx/templates/*.template into /etc/nginx/conf.d, substituting only the variables
# whose names start with $NGINX_ENVSUBST_FILTER (as the official image does).
set -eu
templates=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
output=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
[ -d "$templates" ] || exit 0
names=$(env | cut -d= -f1 | grep "^${NGINX_ENVSUBST_FILTER:-}" | sed 's/^/$/' | tr '\n' ' ')
for template in "$templates"/*.template; do
  [ -f "$template" ] || continue
  target="$output/$(basename "$template" .template)"
  echo "$0: rendering $template to $target"
  envsubst "$names" < "$template" > "$target"
done
