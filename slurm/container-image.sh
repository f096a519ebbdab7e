#!/usr/bin/env bash
# A real Charliecloud image directory for the container tests (Debian/Ubuntu host with dpkg, as root).
#
#   slurm/container-image.sh [--rebuild]      the image's path is the last line of stdout; the log goes to stderr
#
# The image is a Debian bookworm minbase root filesystem (debootstrap) plus only the Debian packages that hold the
# shared libraries the venv's interpreter and its compiled wheels link to (ldd; torch, numpy, pillow... vendor the
# rest). It holds NO Python: the host's interpreter and the project's venv are bound in at their own paths,
#
#   USER=${USER:-root} ch-run -b /root/.pyenv:/root/.pyenv -b /work:/work --cd /work/main IMAGE -- \
#       /work/main/.venv/bin/python ...
#
# so the venv's pyvenv.cfg `home` and its symlinks resolve in the container as on the host. ch-run 0.31 needs $USER
# set, starts the command in / unless --cd is given, and cannot create a missing bind destination in a read-only
# image: the image has the mount points for those binds (the interpreter's top folder, /root/.pyenv, and the venv's,
# /work) and for what ch-run binds itself (/etc/hosts, /etc/resolv.conf, /etc/machine-id, /etc/passwd, /etc/group,
# /dev, /proc, /sys, /tmp, /home). Before it is put in place, ldd run in the image on every compiled file must find
# what it finds on the host.
#
# Installs, where missing: debootstrap (+ debian-archive-keyring) and Charliecloud's runtime (charliecloud-runtime:
# ch-run). Builds into a temporary folder beside the image and renames it into place only when complete and checked,
# so an interrupted build leaves nothing a later run reuses (the next build removes the leftover). Concurrent runs
# wait on a lock (IMAGE.lock). A run that finds the image built for the same interpreter and venv returns at once
# (a few stat calls); after a pip install it re-scans the libraries (seconds) and rebuilds only if a package is
# missing.
#
# Settings (environment):
#   PIPELINE_IMAGE_CACHE   the folder the image goes in          (default /var/cache/pipeline-images/bookworm-minbase)
#   PIPELINE_IMAGE_VENV    the venv whose interpreter and wheels the image serves  (default: this repository's .venv)
#   PIPELINE_IMAGE_MIRROR  Debian mirror for debootstrap                           (default http://deb.debian.org/debian)
#   PIPELINE_IMAGE_BINDS   more mount points to make in the image (absolute paths, space-separated)
set -euo pipefail

RECIPE=2  # bump when the recipe below changes: every cached image is then rebuilt
SUITE=bookworm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE=${PIPELINE_IMAGE_CACHE:-/var/cache/pipeline-images/bookworm-minbase}
VENV=${PIPELINE_IMAGE_VENV:-$(dirname "$HERE")/.venv}
MIRROR=${PIPELINE_IMAGE_MIRROR:-http://deb.debian.org/debian}
STAMP=.pipeline-image   # in the image: key=, recipe=, packages=, built=; written last
REBUILD=0
case ${1:-} in
  --rebuild) REBUILD=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "container-image: unknown argument ${1}; usage: $0 [--rebuild]" >&2; exit 2 ;;
esac

log() { printf '[container-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
secs() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

IMAGE=$(realpath -m -- "$IMAGE")
case $IMAGE in
  /|/bin|/boot|/dev|/etc|/home|/lib|/lib64|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/var|/var/cache|/work|/usr/*|/etc/*|/proc/*|/sys/*|/dev/*|/boot/*)
    die "refusing PIPELINE_IMAGE_CACHE=$IMAGE: a system folder" ;;
esac
[ -x "$VENV/bin/python" ] || die "no venv at $VENV (set PIPELINE_IMAGE_VENV)"
PYTHON=$(readlink -f -- "$VENV/bin/python")       # the interpreter the venv runs (pyvenv.cfg's home)
PREFIX=$(dirname "$(dirname "$PYTHON")")           # its prefix: stdlib, lib-dynload, libpython
VENV_REAL=$(readlink -f -- "$VENV")
SITE=$(echo "$VENV_REAL"/lib/python3*/site-packages)
DYNLOAD=$(echo "$PREFIX"/lib/python3*/lib-dynload)

# What the image is built for, cheaply (three stats): the recipe, the interpreter, the venv's and the stdlib's
# installed set (a folder's mtime changes when an entry is added or removed).
KEY="r$RECIPE $SUITE $(stat -c '%n %Y %s' -- "$PYTHON" "$SITE" "$DYNLOAD" | md5sum | cut -c1-16) ${PIPELINE_IMAGE_BINDS:-}"
# mount points: the interpreter's and the venv's top folders (/root/.pyenv: a pyenv, its shims and versions; /work)
bind_points() {
  local p
  for p in "$PREFIX" "$VENV_REAL" ${PIPELINE_IMAGE_BINDS:-}; do
    case $p in
      /root/?*) echo "/root/$(cut -d/ -f3 <<<"$p")" ;;
      /?*) echo "/$(cut -d/ -f2 <<<"$p")" ;;
    esac
  done | sort -u
}
stamp_field() { sed -n "s/^$1=//p" "$IMAGE/$STAMP" 2>/dev/null; }

# fast path: built for exactly this
if [ "$REBUILD" = 0 ] && [ "$(stamp_field key)" = "$KEY" ]; then echo "$IMAGE"; exit 0; fi

mkdir -p -- "$(dirname "$IMAGE")"
exec 9>"$IMAGE.lock"
if ! flock -n 9; then log "another run is building $IMAGE: waiting for it"; flock 9; fi
if [ "$REBUILD" = 0 ] && [ "$(stamp_field key)" = "$KEY" ]; then echo "$IMAGE"; exit 0; fi  # it did
T0=$(date +%s.%N)

# --- 1. the host's tools ---------------------------------------------------------------------------------------
APT=(apt-get -o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends)
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
command -v ch-run >/dev/null || missing+=(charliecloud-runtime)
if [ ${#missing[@]} -gt 0 ]; then
  t=$(date +%s.%N)
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" install "${missing[@]}" >/dev/null 2>&1 || { apt-get -qq update && "${APT[@]}" install "${missing[@]}" >/dev/null; }
  log "apt-get install took $(secs "$t") s"
fi
export USER=${USER:-$(id -un)}  # ch-run refuses to start without it

# --- 2. the Debian packages that hold the libraries the interpreter and the wheels link to -------------------
t=$(date +%s.%N)
SOFILES=$( { echo "$PYTHON"; find "$PREFIX/lib" -maxdepth 1 -name 'libpython*.so*' -type f
             find "$DYNLOAD" "$SITE" -name '*.so*' -type f; } | sort -u)
ldd_all() { xargs -d '\n' -n 64 ldd 2>/dev/null || true; }  # ldd's output for each file read from stdin
lib_packages() {  # one package a line
  local lib pkg cand
  while IFS= read -r lib; do
    case $lib in ""|"$PREFIX"/*|"$VENV_REAL"/*) continue ;; esac  # bound in with the interpreter / the venv
    pkg=""
    for cand in "$lib" "$(readlink -f -- "$lib")" "/usr$lib" "/usr$(readlink -f -- "$lib")"; do
      pkg=$(dpkg -S -- "$cand" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$pkg" ] && break
    done
    if [ -n "$pkg" ]; then echo "$pkg"; else log "warning: $lib is in no Debian package: the image will lack it"; fi
  done < <(ldd_all <<<"$SOFILES" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' | sort -u)
}
PACKAGES=$(lib_packages | sort -u)
PACKAGE_LIST=$(paste -sd' ' <<<"$PACKAGES")
log "$(wc -l <<<"$SOFILES") compiled files need (ldd, $(secs "$t") s): $PACKAGE_LIST"

make_bind_points() {  # in image $1
  local p
  while IFS= read -r p; do [ -n "$p" ] && mkdir -p -- "$1$p"; done < <(bind_points)
}
# the image there was built by this recipe and holds every package needed: only the key changes
if [ "$REBUILD" = 0 ] && [ -d "$IMAGE" ] && [ "$(stamp_field recipe)" = "r$RECIPE $SUITE" ] &&
   [ -z "$(comm -23 <(echo "$PACKAGES") <(stamp_field packages | tr ' ' '\n' | sort -u))" ]; then
  make_bind_points "$IMAGE"
  sed -i "s|^key=.*|key=$KEY|" "$IMAGE/$STAMP"
  log "$IMAGE already holds all of them"
  echo "$IMAGE"; exit 0
fi

# --- 3. debootstrap into a temporary folder beside the image ---------------------------------------------------
unmount_under() {  # every mount under $1, deepest first (debootstrap mounts /proc and /sys, may bind /dev)
  local m
  awk -v d="$1/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while IFS= read -r m; do
    umount -l -- "$m" 2>/dev/null || true
  done
  return 0
}
remove_tree() {  # never through a mount into the host
  [ -e "$1" ] || return 0
  unmount_under "$1"
  rm -rf --one-file-system -- "$1"
}
DIR=$(dirname "$IMAGE") BASE=$(basename "$IMAGE")
for old in "$DIR/.$BASE.tmp."* "$DIR/.$BASE.old."*; do  # interrupted builds' (we hold the lock: none is running)
  [ -e "$old" ] || continue
  log "removing the leftover $old"
  remove_tree "$old"
done
TMP=$(mktemp -d "$DIR/.$BASE.tmp.XXXXXX")
chmod 755 "$TMP"
DB_PID=""
cleanup() {
  if [ -n "$DB_PID" ]; then kill -TERM -- "-$DB_PID" 2>/dev/null || true; wait "$DB_PID" 2>/dev/null || true; fi
  remove_tree "$TMP"
  rm -f -- "$TMP.log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

t=$(date +%s.%N)
log "debootstrap --variant=minbase $SUITE into $TMP"
# in the background, in a session of its own: a signal to this script stops it (and its dpkg) at once
setsid debootstrap --variant=minbase --include="$(paste -sd, <<<"$PACKAGES")" "$SUITE" "$TMP" "$MIRROR" \
  > "$TMP.log" 2>&1 < /dev/null &
DB_PID=$!
if ! wait "$DB_PID"; then DB_PID=""; tail -20 "$TMP.log" >&2; cp "$TMP.log" "$DIR/$BASE.failed.log"
  die "debootstrap failed (its log: $DIR/$BASE.failed.log)"; fi
DB_PID=""
unmount_under "$TMP"
log "debootstrap took $(secs "$t") s"

# --- 4. what ch-run and our binds need in the image ------------------------------------------------------------
for f in etc/hosts etc/resolv.conf etc/machine-id etc/passwd etc/group; do [ -e "$TMP/$f" ] || touch "$TMP/$f"; done
mkdir -p "$TMP"/{dev,proc,sys,tmp,home,mnt,var/tmp}
chmod 1777 "$TMP/tmp" "$TMP/var/tmp"
make_bind_points "$TMP"
# nothing needed at run time: apt's downloads and lists, docs, man pages, message translations
rm -rf "$TMP"/var/cache/apt/archives/*.deb "$TMP"/var/cache/apt/*.bin "$TMP"/var/lib/apt/lists/* \
       "$TMP"/usr/share/doc/* "$TMP"/usr/share/man/* "$TMP"/usr/share/info/* "$TMP"/usr/share/locale/* \
       "$TMP"/var/log/*.log "$TMP"/var/cache/debconf/*-old

# the check: ldd in the image finds every library it finds on the host
t=$(date +%s.%N)
BINDS=()
while IFS= read -r p; do BINDS+=(-b "$p:$p"); done < <(bind_points)
unfound() { grep 'not found' | sort -u; }
host_missing=$(ldd_all <<<"$SOFILES" | unfound)
image_missing=$(ch-run "${BINDS[@]}" "$TMP" -- xargs -d '\n' -n 64 ldd <<<"$SOFILES" 2>/dev/null | unfound || true)
lacking=$(comm -13 <(echo "$host_missing") <(echo "$image_missing"))
[ -z "$lacking" ] || die "in the image, ldd finds no: $(echo "$lacking" | awk '{ print $1 }' | sort -u | xargs)"
ch-run "${BINDS[@]}" "$TMP" -- "$VENV_REAL/bin/python" -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, readline' ||
  die "the venv's python fails in the image"
log "checked in the image with ch-run ($(secs "$t") s)"
printf 'key=%s\nrecipe=%s\npackages=%s\nbuilt=%s\n' "$KEY" "r$RECIPE $SUITE" "$PACKAGE_LIST" "$(date -Is)" \
  > "$TMP/$STAMP"

# --- 5. into place ---------------------------------------------------------------------------------------------
if [ -e "$IMAGE" ]; then  # two renames (a directory cannot replace a non-empty one): briefly no image, under the lock
  OLD="$DIR/.$BASE.old.$$"
  mv -T -- "$IMAGE" "$OLD"
  mv -T -- "$TMP" "$IMAGE"
  remove_tree "$OLD"
else
  mv -T -- "$TMP" "$IMAGE"
fi
trap - EXIT
rm -f -- "$TMP.log" "$DIR/$BASE.failed.log"
log "built $IMAGE: $(du -sh --one-file-system "$IMAGE" | cut -f1), $(secs "$T0") s in all"
echo "$IMAGE"
