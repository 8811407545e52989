#!/usr/bin/env bash
# Builds the container images `wasm-raft/<name>:latest` FROM scratch out of the release
# binaries that scripts/build.sh made (no second build, no registry, no network):
# each binary, stripped of its debug info, with the shared libraries `ldd` lists and the
# dynamic loader, an /etc/nsswitch.conf (glibc resolves names through NSS; its `files`
# and `dns` sources are built into libc since 2.34), /etc/passwd and /etc/group for the
# non-root user 10001, and a /data directory that user owns. Guests are never copied in:
# they are mounted (a volume in compose, a ConfigMap in Kubernetes).
#
#   bash scripts/images.sh              # every image
#   bash scripts/images.sh host logger  # some of them
#
# Prints one line per image with its size. Needs the Docker engine, and `tini-static`
# (Debian's tini package, installed with docker.io) for the images whose binary does not
# handle SIGTERM itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REPO=${IMAGE_REPO:-wasm-raft}
TAG=${IMAGE_TAG:-latest}
UID_GID=10001

# name | binaries (the first is the entrypoint) | init: "tini" when the entrypoint has no
# SIGTERM handler (as PID 1 it would ignore the signal; tini forwards it and the process
# takes the default action), "none" when it stops gracefully by itself.
# A new image is one more line. The logger image carries `recovery` beside it (run it with
# --entrypoint /bin/recovery); both stop gracefully on SIGTERM (host::daemon).
IMAGES=(
  "host|host|none"
  "kv|kv|tini"
  "loadgen|loadgen|tini"
  "logger|logger recovery|none"
)

TINI=${TINI:-/usr/bin/tini-static}
STAGE_ROOT=target/images

die() { echo "images.sh: $*" >&2; exit 1; }

# Copies a file to the same path under $stage, following symlinks (the loader and the
# libraries are often links).
copy_abs() {
  local file=$1 stage=$2
  mkdir -p "$stage$(dirname "$file")"
  cp -L "$file" "$stage$file"
}

# The shared libraries and the loader a dynamic binary needs, one absolute path a line.
libs_of() {
  ldd "$1" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}'
}

build_image() {
  local name=$1 bins=$2 init=$3
  local stage="$STAGE_ROOT/$name"
  local root="$stage/rootfs"
  rm -rf "$stage"
  mkdir -p "$root/bin" "$root/etc" "$stage/data"
  local b entry=""
  for b in $bins; do
    [[ -x target/release/$b ]] || die "target/release/$b is missing: run scripts/build.sh first"
    # Debug info out (most of the size), symbols kept for profiles and backtraces.
    objcopy --strip-debug "target/release/$b" "$root/bin/$b"
    local lib
    while read -r lib; do
      [[ -n $lib ]] && copy_abs "$lib" "$root"
    done < <(libs_of "target/release/$b")
    [[ -z $entry ]] && entry="/bin/$b"
  done
  local entrypoint="[\"$entry\"]"
  if [[ $init == tini ]]; then
    if [[ ! -x $TINI ]] && ((EUID == 0)) && command -v apt-get >/dev/null; then
      apt-get install -y -qq tini >/dev/null
    fi
    [[ -x $TINI ]] || die "$TINI is missing (apt-get install tini)"
    cp "$TINI" "$root/bin/tini"
    entrypoint="[\"/bin/tini\", \"--\", \"$entry\"]"
  fi
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf 'root:x:0:0:root:/:/bin/false\nraft:x:%s:%s:raft:/data:/bin/false\n' "$UID_GID" "$UID_GID" >"$root/etc/passwd"
  printf 'root:x:0:\nraft:x:%s:\n' "$UID_GID" >"$root/etc/group"
  cat >"$stage/Dockerfile" <<EOF
FROM scratch
COPY --chown=0:0 rootfs/ /
COPY --chown=$UID_GID:$UID_GID data/ /data/
ENV HOME=/data
WORKDIR /data
USER $UID_GID:$UID_GID
STOPSIGNAL SIGTERM
ENTRYPOINT $entrypoint
EOF
  # The engine's classic builder: FROM scratch needs nothing from a registry, and it
  # does not need the buildx plugin.
  # Its deprecation notice is noise: stderr is shown only when the build fails.
  if ! DOCKER_BUILDKIT=0 docker build -q -t "$REPO/$name:$TAG" \
    --label "org.opencontainers.image.revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$stage" >/dev/null 2>"$stage/build.err"; then
    cat "$stage/build.err" >&2
    die "docker build of $name failed"
  fi
  local size
  size=$(docker image inspect -f '{{.Size}}' "$REPO/$name:$TAG")
  awk -v n="$REPO/$name:$TAG" -v s="$size" 'BEGIN { printf "%-24s %6.1f MB\n", n, s / 1e6 }'
}

want=("$@")
command -v docker >/dev/null || die "docker is not installed"
found=0
for line in "${IMAGES[@]}"; do
  IFS='|' read -r name bins init <<<"$line"
  if ((${#want[@]})) && [[ ! " ${want[*]} " == *" $name "* ]]; then
    continue
  fi
  build_image "$name" "$bins" "$init"
  found=$((found + 1))
done
((found)) || die "no image named ${want[*]}; known: $(printf '%s ' "${IMAGES[@]%%|*}")"
