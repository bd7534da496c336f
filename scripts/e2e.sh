#!/usr/bin/env bash
# End to end, without Docker or a cluster: build the Dockerfile with podman, run
# manifests/deployment.yaml with `podman kube play` (so its CPU and memory limits,
# user and read-only root apply), wait for /readyz, detect the dog in
# ../shared/images/darknet/dog.jpg, then SIGTERM the server and expect exit 0.
#
# No registry but PyPI and Debian's is reachable here, so the Dockerfile's pinned
# base is impersonated by a stand-in: Debian bookworm (debootstrap) with its
# Python 3.11 and pip, cached in $E2E_CACHE so later runs skip that step.
# Everything else (podman's storage and config, the pod, the images) lives in a
# private temporary folder that is removed on exit.
#
# Usage: scripts/e2e.sh   (make e2e). Needs root, for apt-get and debootstrap.
# Env: PY (a Python with PyYAML, default .venv/bin/python), E2E_CACHE, E2E_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

PY=${PY:-.venv/bin/python}
CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/podlens-e2e}
DOG=../shared/images/darknet/dog.jpg
IMAGE=localhost/podlens:e2e
BASE=docker.io/library/$(awk '$1 == "FROM" { print $2; exit }' Dockerfile)
# Bump the suffix when the stand-in's recipe below changes.
STANDIN=$CACHE/python-standin-bookworm-v1.tar

say() { echo "e2e: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
trap 'say "FAILED at line $LINENO: $BASH_COMMAND"' ERR

debian_mirror() {
  # The first Debian mirror this machine's apt is configured with.
  cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -v '^\s*#' \
    | grep -m 1 -oE 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' || true
}

[[ -f $DOG ]] || fail "$DOG is missing: the shared photos must sit beside the repo"
[[ -f server.py ]] || fail "server.py is missing"

# --- tools ---------------------------------------------------------------------
missing=()
for tool in podman buildah runc catatonit debootstrap; do
  command -v "$tool" >/dev/null || [[ -x /usr/libexec/podman/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  # Another apt run on the machine holds the lock for a while: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    podman buildah runc catatonit debootstrap >/dev/null
fi

# --- private podman configuration ------------------------------------------------
WORK=$(mktemp -d /var/tmp/podlens-e2e.XXXXXX)  # not /tmp: vfs layers are large
# Podman writes a blob cache into /var/lib/containers whatever its configuration
# says: remove that folder too if this run created it.
created=("$WORK")
[[ -e /var/lib/containers ]] || created+=(/var/lib/containers)
cleanup() {
  local status=$?
  podman pod rm --all --force --time 0 >/dev/null 2>&1 || true
  podman system reset --force >/dev/null 2>&1 || true  # unmounts and deletes the private storage
  rm -rf "${created[@]}"
  say "total time $((SECONDS - started)) s"
  exit "$status"
}
trap cleanup EXIT

export CONTAINERS_CONF=$WORK/containers.conf
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf
# Podman's and buildah's default ulimits (1048576) are above this sandbox's hard
# limits, which nothing here may raise (no CAP_SYS_RESOURCE): use the current ones.
# Podman lowers its own nproc to kernel.pid_max first, so no more than that.
nproc=$(ulimit -u)
pid_max=$(cat /proc/sys/kernel/pid_max)
((nproc <= pid_max)) || nproc=$pid_max
ulimits=("nofile=$(ulimit -n):$(ulimit -n)" "nproc=$nproc:$nproc")
cat >"$CONTAINERS_CONF" <<EOF
[containers]
netns = "host"
default_ulimits = ["${ulimits[0]}", "${ulimits[1]}"]

[engine]
runtime = "runc"
# No systemd here to own cgroups; cgroupfs still enforces the pod's limits.
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"

[network]
network_config_dir = "$WORK/networks"
EOF
# vfs: works on any filesystem, including one that is already an overlay.
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "vfs"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
# Short names (the Dockerfile's FROM) resolve to Docker Hub, where the stand-in is tagged.
cat >"$CONTAINERS_REGISTRIES_CONF" <<EOF
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF

# --- stand-in base image -------------------------------------------------------------
if [[ ! -f $STANDIN ]]; then
  mirror=${E2E_MIRROR:-$(debian_mirror)}
  [[ -n $mirror ]] || fail "no Debian mirror in /etc/apt/sources.list*; set E2E_MIRROR"
  say "building the stand-in for $BASE from $mirror (cached in $STANDIN)"
  rootfs=$WORK/rootfs
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  # As in the official image: `python` on PATH, and pip may install system-wide
  # (Debian marks its Python externally managed).
  ln -s /usr/bin/python3 "$rootfs/usr/local/bin/python"
  rm "$rootfs/usr/lib/python3.11/EXTERNALLY-MANAGED"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  mkdir -p "$CACHE"
  tar -C "$rootfs" -cf "$STANDIN.partial" .
  mv "$STANDIN.partial" "$STANDIN"
  rm -rf "$rootfs"
fi
podman import --quiet --change 'CMD ["python3"]' "$STANDIN" "$BASE" >/dev/null

# --- image ------------------------------------------------------------------------------
say "building $IMAGE"
# The host's CA bundle, so pip trusts whatever the host's pip trusts.
podman build --quiet --pull=never --network host --ulimit "${ulimits[0]}" --ulimit "${ulimits[1]}" \
  --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  --tag "$IMAGE" . >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
say "image size $((size / 1000000)) MB ($(((size - base_size) / 1000000)) MB on top of the base)"

# --- run the deployment -------------------------------------------------------------------
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# A copy of the real manifest with what only a cluster has taken out: the local image,
# the host's network on a free port (podman has no Service to route to the pod).
"$PY" - "$IMAGE" "$port" >"$WORK/deployment.yaml" <<'EOF'
import sys
import yaml

image, port = sys.argv[1:]
deployment = yaml.safe_load(open("manifests/deployment.yaml"))
pod = deployment["spec"]["template"]["spec"]
pod["hostNetwork"] = True
(container,) = pod["containers"]
container.update(image=image, imagePullPolicy="Never")
container["env"].append({"name": "PORT", "value": port})
# Port mappings mean nothing on the host network; the probes name the mapped port
# and podman would run them with curl, which the image lacks: this script probes.
for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
    del container[key]
yaml.safe_dump(deployment, sys.stdout)
EOF
say "podman kube play (port $port)"
# It prints "Pod:", the pod's id, "Container:", the container's id.
container=$(podman kube play "$WORK/deployment.yaml" | awk 'previous == "Container:" { print; exit } { previous = $0 }')
url=http://127.0.0.1:$port

booted=$SECONDS
deadline=$((SECONDS + 60))
until curl -fs "$url/readyz" >/dev/null; do
  [[ $(podman inspect --format '{{.State.Running}}' "$container") == true ]] \
    || { podman logs "$container"; fail "the server exited before it was ready"; }
  ((SECONDS < deadline)) || { podman logs "$container"; fail "not ready within 60 s"; }
  sleep 0.5
done
say "ready after $((SECONDS - booted)) s"

answer=$(curl -fsS -H 'Content-Type: image/jpeg' --data-binary "@$DOG" "$url/api/object_detection")
labels=$("$PY" -c 'import json, sys; print(" ".join(o["label"] for o in json.load(sys.stdin)["objects"]))' <<<"$answer")
say "detected: $labels"
[[ " $labels " == *" dog "* ]] || fail "no dog in $answer"
curl -fsS -o /dev/null "$url/" || fail "no page at /: is static/ in the image?"

# What the pod really ran with: the manifest's limits, user and read-only root.
podman inspect --format 'cpu quota {{.HostConfig.CpuQuota}}/{{.HostConfig.CpuPeriod}} us, memory {{.HostConfig.Memory}} B, user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}' \
  "$container" | sed 's/^/e2e: pod: /' >&2
say "pod: THREADS=$(podman exec "$container" printenv THREADS) from limits.cpu," \
  "server threads $(curl -fsS "$url/api/model" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["threads"])')"

# SIGTERM, as the kubelet sends it; SIGKILL only after the manifest's grace period.
grace=$("$PY" -c 'import yaml; print(yaml.safe_load(open("manifests/deployment.yaml"))["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])')
podman stop --time "$grace" "$container" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
[[ $code == 0 ]] || { podman logs "$container" | tail -n 20; fail "exit code $code after SIGTERM"; }
podman logs "$container" 2>&1 | tail -n 1 | sed 's/^/e2e: last log line: /' >&2
say "passed: built, ran under the manifest's limits, found the dog, exited 0 on SIGTERM"
