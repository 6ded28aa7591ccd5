#!/bin/sh
# Debian packages the stack and its tests need: nginx, envsubst, curl, Chromium and its driver,
# Prometheus (the autoscaler query test) and kubectl (kustomize builds of k8s/).
# Installs only what is missing; needs root (or sudo).
set -eu
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
command -v envsubst >/dev/null 2>&1 || missing="$missing gettext-base"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
[ -n "$missing" ] || exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
echo "installing Debian packages:$missing"
$sudo apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
