#!/bin/sh
# Prepare podman on a Debian machine without Docker or a registry (like our CI and dev machines),
# so `make compose-test` can build and run the compose stack for real. Needs root.
#
#   deploy/podman/setup.sh
#
# - installs podman, buildah, runc and podman-compose's helpers from Debian;
# - configures runc (crun fails under cgroups v1/hybrid) and ulimits within the hard limits;
# - builds the base images the Dockerfiles name (python, nginx, prometheus, exporter) locally from
#   Debian bookworm, because no registry can be reached, and tags them with those exact names.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
rootfs_tar=${QAIO_PODMAN_ROOTFS:-/var/tmp/qaio-debian-bookworm.tar}
mirror=${QAIO_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then
  echo "run as root (podman here runs rootful)" >&2
  exit 1
fi

if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
    || ! command -v iptables >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc fuse-overlayfs slirp4netns \
    uidmap debootstrap netavark aardvark-dns iptables >/dev/null  # netavark sets up bridges with iptables
fi

hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
nproc=32768
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<CONF
# Written by deploy/podman/setup.sh
[containers]
default_ulimits = ["nofile=$hard_nofile:$hard_nofile", "nproc=$nproc:$nproc"]

[network]
# netavark + aardvark-dns: compose services find each other by name (Debian's CNI default lacks plugins).
network_backend = "netavark"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

if ! podman image exists localhost/qaio-debian:bookworm; then
  if [ ! -s "$rootfs_tar" ]; then
    rootfs=$(mktemp -d /var/tmp/qaio-rootfs.XXXXXX)
    echo "debootstrap bookworm into $rootfs (once)..."
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$rootfs_tar" .
    rm -rf "$rootfs"
  fi
  podman import --change 'CMD ["/bin/bash"]' "$rootfs_tar" localhost/qaio-debian:bookworm >/dev/null
fi

build_standin() {  # containerfile tag
  if podman image exists "$2"; then
    return 0
  fi
  echo "building local stand-in $2..."
  podman build --format docker --network host -q -f "$here/standins/$1" -t "$2" "$here/standins" >/dev/null
}

build_standin python.Containerfile docker.io/library/python:3.11-slim-bookworm
build_standin nginx.Containerfile docker.io/library/nginx:1.28-bookworm
build_standin prometheus.Containerfile docker.io/prom/prometheus:v3.5.0
build_standin nginx-exporter.Containerfile docker.io/nginx/nginx-prometheus-exporter:1.4.2
# The log exporter's base: the same Debian bookworm root file system.
podman image exists docker.io/library/debian:bookworm-slim \
  || podman tag localhost/qaio-debian:bookworm docker.io/library/debian:bookworm-slim
echo "podman is ready: $(podman --version), runtime runc, base images built locally"
