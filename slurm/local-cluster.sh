#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for trying and testing the Slurm path (Debian/Ubuntu, as root).
#
#   slurm/local-cluster.sh up [--nodes N] [--netns]
#                                           install Debian's packages if missing, start munged, MariaDB + slurmdbd
#                                           (so sacct works), slurmctld and N slurmd; wait until N nodes are idle.
#                                           --netns: each node in its own network namespace with its own address
#                                           (SUBNET.11, .12, ...) and hostname, joined by a bridge (SUBNET.1)
#   slurm/local-cluster.sh down             stop exactly the daemons this script started (pid files), undo /etc/hosts
#   slurm/local-cluster.sh status           what is running, sinfo and squeue
#
# Then, in a shell that uses the cluster:   source "$PIPELINE_SLURM_DIR/env.sh"   (sets SLURM_CONF)
#
# Everything it writes (config, munge key, state, logs, database) lives under PIPELINE_SLURM_DIR
# (default /tmp/pipeline-slurm), a folder of its own: `up` refuses /, a home, a system folder, or a non-empty
# folder it did not make (it marks its own with .pipeline-local-cluster). Outside it are only munged's socket in
# /run/munge (Slurm's clients look there) and an /etc/hosts line naming the nodes, because the worker's
# rendezvous uses the first node's name as MASTER_ADDR; /etc/hosts is replaced by a rename where it can be (not
# where it is a bind mount, as in some containers). `down` stops a daemon only if its pid is that daemon and it
# runs from this folder. The database password is made anew for every cluster. N nodes are N slurmd on 127.0.0.1, one port each, or (--netns) N slurmd in network namespaces
# of their own; the controller, the database and the users' commands stay in this namespace either way.
# `up` on a running cluster of the same shape does nothing; of another shape, it restarts it.
set -euo pipefail

LAB=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
PREFIX=${PIPELINE_SLURM_NODE_PREFIX:-node}
CPUS=${PIPELINE_SLURM_CPUS_PER_NODE:-$(nproc)}
MEM_MB=${PIPELINE_SLURM_MEM_PER_NODE_MB:-4000}
BASE_PORT=${PIPELINE_SLURM_BASE_PORT:-17100}
CTLD_PORT=${PIPELINE_SLURM_CTLD_PORT:-6917}
DBD_PORT=${PIPELINE_SLURM_DBD_PORT:-6919}
DB_PORT=${PIPELINE_SLURM_DB_PORT:-33166}
SUBNET=${PIPELINE_SLURM_SUBNET:-10.231.0}  # --netns: addresses inside this script's own namespaces only
BRIDGE=${PIPELINE_SLURM_BRIDGE:-plslurm0}  # --netns: the bridge; namespaces are $BRIDGE-<node>
HOSTS_TAG="# pipeline local-cluster $LAB"
MARK=.pipeline-local-cluster  # in the folder: it is this script's to remove and rewrite
export SLURM_CONF=$LAB/etc/slurm.conf

log() { printf '[local-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

wait_for() {  # wait_for <seconds> <command...>
  local i
  for ((i = 0; i < $1 * 5; i++)); do "${@:2}" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out after $1 s waiting for: ${*:2}"; return 1
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

refuse_lab() { echo "local-cluster: refusing PIPELINE_SLURM_DIR=$LAB: $*" >&2; exit 2; }

check_lab() {  # the folder `up` empties and fills must be this script's own
  local real home
  real=$(realpath -m -- "$LAB")
  case $real in
    /|/bin|/boot|/dev|/etc|/home|/lib|/lib64|/media|/mnt|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/var|/usr/*|/etc/*|/boot/*|/proc/*|/sys/*|/dev/*)
      refuse_lab "a system folder ($real)" ;;
  esac
  while IFS= read -r home; do
    [ -n "$home" ] && [ "$real" = "$(realpath -m -- "$home")" ] && refuse_lab "a home folder ($real)"
  done < <(getent passwd | cut -d: -f6; echo "${HOME:-}")
  if [ -d "$real" ] && [ -n "$(ls -A -- "$real")" ] && [ ! -e "$real/$MARK" ]; then
    refuse_lab "$real holds files this script did not make (no $MARK): choose an empty or new folder"
  fi
  [ -L "$LAB" ] && refuse_lab "a symbolic link"
  return 0
}

node_addr() { if [ "$NETNS" = 1 ]; then echo "$SUBNET.$((10 + $1))"; else echo 127.0.0.1; fi; }

write_config() {
  local n=$1 i ctl=localhost host
  [ "$NETNS" = 1 ] && ctl="$(hostname -s)($SUBNET.1)"  # the nodes reach the controller over the bridge
  mkdir -p "$LAB"/{etc,state/ctld,log,run,munge}
  cat > "$LAB/etc/slurm.conf" <<EOF
ClusterName=pipelinelab
SlurmctldHost=$ctl
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
# requeued jobs may only restart after cred_expire (default 120 s)
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$LAB/state/ctld
SlurmdSpoolDir=$LAB/state/spool-%n
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# node resources come from this file, not from the (shared) hardware
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# scheduler loop every 2 s (default 60): a requeued job waits for it
SchedulerParameters=sched_interval=2,bf_interval=2
# submitit ignores SIGTERM, so a cancelled job lingers KillWait seconds before SIGKILL (default 30)
KillWait=5
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
EOF
  for ((i = 1; i <= n; i++)); do
    host=localhost
    [ "$NETNS" = 1 ] && host=$PREFIX$i
    echo "NodeName=$PREFIX$i NodeHostname=$host NodeAddr=$(node_addr "$i") Port=$((BASE_PORT + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >> "$LAB/etc/slurm.conf"
    mkdir -p "$LAB/state/spool-$PREFIX$i"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$LAB/etc/slurm.conf"
  cat > "$LAB/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LAB/log/slurmdbd.log
PidFile=$LAB/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$LAB/etc/slurmdbd.conf"  # it holds the database password
  echo "export SLURM_CONF=$LAB/etc/slurm.conf" > "$LAB/env.sh"
  echo "$n${NETNS:+ netns}" > "$LAB/nodes"
}

replace_hosts() {  # replace_hosts <content>: a rename, so no reader sees half a file; in place where /etc/hosts is a
  local tmp         # bind mount (containers), which cannot be renamed over
  tmp=$(mktemp /etc/.hosts.pipeline.XXXXXX)
  printf '%s' "$1" > "$tmp"
  chmod --reference=/etc/hosts "$tmp" 2>/dev/null || chmod 644 "$tmp"
  if ! mv -f -- "$tmp" /etc/hosts 2>/dev/null; then
    rm -f -- "$tmp"
    log "/etc/hosts cannot be renamed over (a bind mount?): rewriting it in place"
    printf '%s' "$1" > /etc/hosts
  fi
}

set_hosts() {  # the nodes' names must resolve: the worker uses the first one as MASTER_ADDR
  local n=$1 lines="" i rest
  for ((i = 1; i <= n; i++)); do lines+="$(node_addr "$i") $PREFIX$i"$'\n'; done
  rest=$(grep -vF -- "$HOSTS_TAG" /etc/hosts || true)
  replace_hosts "$(printf '%s\n%s' "$rest" "$(printf '%s' "$lines" | sed "s|\$| $HOSTS_TAG|")")"$'\n'
  # what the nodes' namespaces see as /etc/hosts (bind-mounted there): localhost, the controller, the nodes
  printf '127.0.0.1 localhost\n%s.1 %s\n%s' "$SUBNET" "$(hostname -s)" "$lines" > "$LAB/etc/hosts"
}

unset_hosts() {
  local rest
  grep -qF -- "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  rest=$(grep -vF -- "$HOSTS_TAG" /etc/hosts || true)
  replace_hosts "$rest"$'\n'
}

start_munge() {
  # Slurm's clients only reach munged on its default socket, so ours listens there, with the key under $LAB;
  # a munged already running on this host (a real cluster's) is used as it is, and left alone by `down`.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "using the munged already running"; return 0; fi
  local m=$LAB/munge
  chmod 700 "$m"
  [ -s "$m/munge.key" ] || mungekey --create --keyfile="$m/munge.key" >/dev/null
  chmod 400 "$m/munge.key"
  mkdir -p /run/munge
  munged --key-file="$m/munge.key" --pid-file="$LAB/run/munged.pid" --log-file="$LAB/log/munged.log" \
         --seed-file="$m/munge.seed" --force
  wait_for 10 sh -c 'munge -n | unmunge'
}

start_database() {  # its socket and pid file in a folder of the mysql user's own, not a world-writable one
  mkdir -p "$LAB/mysql" "$LAB/mysql-run"; chown mysql:mysql "$LAB/mysql" "$LAB/mysql-run"; chmod 700 "$LAB/mysql-run"
  mariadb-install-db --user=mysql --datadir="$LAB/mysql" --auth-root-authentication-method=socket \
      --skip-test-db > "$LAB/log/mariadb-install.log" 2>&1
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$LAB/mysql" --socket="$LAB/mysql-run/mysqld.sock" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$LAB/mysql-run/mariadbd.pid" \
      --log-error="$LAB/log/mariadb.err" </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb --socket="$LAB/mysql-run/mysqld.sock" -e 'select 1'
  mariadb --socket="$LAB/mysql-run/mysqld.sock" -e "
     CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS'; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  slurmdbd  # daemonizes; reads slurmdbd.conf beside $SLURM_CONF
  wait_for 30 sacctmgr -n show cluster
}

start_namespaces() {  # a bridge here, and per node a namespace with a veth into it
  local n=$1 i ns
  echo "$BRIDGE" > "$LAB/run/bridge"  # what `down` removes, and nothing else
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((i = 1; i <= n; i++)); do
    ns=$BRIDGE-$PREFIX$i
    ip netns add "$ns"
    ip link add "${BRIDGE}v$i" type veth peer name eth0 netns "$ns"
    ip link set "${BRIDGE}v$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

stop_namespaces() {  # the bridge and namespaces this cluster made, if it made any (deleting a namespace
  local bridge ns    # deletes its veth pair)
  [ -s "$LAB/run/bridge" ] || return 0
  bridge=$(cat "$LAB/run/bridge"); rm -f "$LAB/run/bridge"
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$bridge-" || true); do ip netns del "$ns"; done
  ip link del "$bridge" 2>/dev/null || true
}

start_slurmd() {  # start_slurmd <i>; with --netns in the node's namespace, with its own hostname and /etc/hosts
  local node=$PREFIX$1
  if [ "$NETNS" != 1 ]; then slurmd -N "$node"; return; fi
  # not `ip netns exec`: it remounts /sys, and slurmd then fails on cgroups
  nsenter --net="/run/netns/$BRIDGE-$node" unshare --uts --mount sh -c \
    "mount --bind '$LAB/etc/hosts' /etc/hosts && hostname '$node' && exec slurmd -N '$node'"
}

idle_nodes() { sinfo -h -t idle -o %D 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

running() { [ -s "$LAB/run/slurmctld.pid" ] && kill -0 "$(cat "$LAB/run/slurmctld.pid")" 2>/dev/null; }

do_up() {
  local n=$1 t0=$SECONDS i
  if running && [ "$(cat "$LAB/nodes" 2>/dev/null)" = "$n${NETNS:+ netns}" ] && scontrol ping >/dev/null 2>&1; then
    log "already up with $n nodes ($LAB)"; return 0
  fi
  check_lab
  [ -e "$LAB/run" ] && do_down
  install_packages
  rm -rf -- "$LAB"; mkdir -p -- "$LAB"; chmod 755 "$LAB"; touch "$LAB/$MARK"
  DB_PASS=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  write_config "$n"
  set_hosts "$n"
  if [ "$NETNS" = 1 ]; then start_namespaces "$n"; fi
  start_munge
  start_database
  slurmctld
  wait_for 30 scontrol ping
  for ((i = 1; i <= n; i++)); do start_slurmd "$i"; done
  wait_for 60 sh -c "[ \"\$(sinfo -h -t idle -o %D | awk '{s += \$1} END {print s + 0}')\" = $n ]"
  log "up: $n idle nodes after $((SECONDS - t0)) s. Use it with: source $LAB/env.sh"
}

ours() {  # ours <pid> <daemon name>: that pid is that daemon, started from this folder (its command line names
  local p=$1   # the folder, or its environment holds our SLURM_CONF); pids get reused, and pid files can be forged
  [[ $p =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] || return 1
  grep -qaF -- "$LAB/" "/proc/$p/cmdline" 2>/dev/null && return 0
  tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qxF -- "SLURM_CONF=$SLURM_CONF"
}

stop_pidfiles() {  # SIGTERM each daemon still running under its recorded pid, wait up to 15 s, then SIGKILL
  local f p name pids=""
  for f in "$@"; do
    [ -s "$f" ] || continue
    p=$(cat "$f"); name=$(basename "$f" .pid); name=${name%%-*}; rm -f "$f"
    if ours "$p" "$name"; then kill "$p" && pids+=" $p"; else log "not stopping pid $p from $f: not our $name"; fi
  done
  [ -n "$pids" ] || return 0
  for _ in $(seq 75); do
    local alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive+=" $p"; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && kill -9 "$p"; done
  return 0
}

do_down() {
  if running; then
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    wait_for 20 sh -c '[ -z "$(squeue -h 2>/dev/null)" ]' || true
  fi
  stop_pidfiles "$LAB"/run/slurmd-*.pid "$LAB/run/slurmctld.pid"
  stop_pidfiles "$LAB/run/slurmdbd.pid"
  stop_pidfiles "$LAB/mysql-run/mariadbd.pid" "$LAB/run/munged.pid"
  stop_namespaces
  unset_hosts
  log "down ($LAB)"
}

do_status() {
  if ! running; then echo "local cluster: not running ($LAB)"; return 3; fi
  echo "local cluster: up ($LAB), $(cat "$LAB/nodes") nodes, $(idle_nodes) idle"
  sinfo
  squeue
}

cmd=${1:-}; shift || true
nodes=2
NETNS=
while [ $# -gt 0 ]; do
  case $1 in
    --netns) NETNS=1; shift ;;
    --nodes) nodes=$2; shift 2 ;;
    --nodes=*) nodes=${1#*=}; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case $cmd in
  up) [[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "--nodes must be a positive integer" >&2; exit 2; }; do_up "$nodes" ;;
  down) do_down ;;
  status) do_status ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
