#!/bin/sh
# Stand-in entrypoint with the official nginx image's contract, written for the local test images.
set -eu
if [ "${1:-}" = "nginx" ]; then
  for script in $(find /docker-entrypoint.d -type f | sort); do
    [ -x "$script" ] || { echo "$0: ignoring $script (not executable)"; continue; }
    case "$script" in
      *.envsh) echo "$0: sourcing $script"; . "$script" ;;
      *.sh) echo "$0: running $script"; "$script" ;;
    esac
  done
fi
exec "$@"
