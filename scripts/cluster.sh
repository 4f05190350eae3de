#!/usr/bin/env bash
# A throw-away lab on 127.0.0.1: a SLURM cluster with accounting (slurmctld, slurmdbd over MariaDB, munge) whose
# default partition `cpu` is one node named after the host, and whose partition `two` is two more nodes, n1 and
# n2, for jobs over two nodes (each node a slurmd of its own on this host), and an MLflow tracking server over
# PostgreSQL, for trying launcher=slurm and for the tests that need them (tests/test_cluster*.py). Everything it
# writes lives under one directory ($GTA_CLUSTER_DIR, by default a directory of /tmp named after this checkout);
# it stops only the daemons it started, by the PIDs it recorded. Needs root (daemons run as root, PostgreSQL as
# its system user) and Debian's packages, which it installs when missing.
#
#   scripts/cluster.sh start    # idempotent: starts what is not running; prints the variables to export
#   scripts/cluster.sh env      # SLURM_CONF=... and GTA_CLUSTER_TRACKING_URI=... (exit 1 when not running)
#   scripts/cluster.sh status   # every daemon, sinfo, the tracking server's health
#   scripts/cluster.sh stop     # cancels the cluster's jobs, stops every daemon, keeps the directory
#   scripts/cluster.sh clean    # stop, then delete the directory
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${GTA_CLUSTER_DIR:-/tmp/gta-cluster-$(printf %s "$ROOT" | md5sum | cut -c1-8)}
VENV=${VENV:-$ROOT/.venv}
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server postgresql)
HOST=$(hostname -s)
# the nodes, each with its slurmd: this host's (partition cpu) and two on the same host (partition two)
NODES=("$HOST" n1 n2)
# A requeued job may start again only once its credential expired (120 s by default): 10 s keeps tests short.
CRED_EXPIRE=${GTA_CLUSTER_CRED_EXPIRE:-10}
# The node advertises more CPUs than the machine has, so that several 1-CPU jobs run at once, and the memory
# of a cluster's node, so that the launcher's defaults (mem_gb: 64) are accepted as they are.
NODE_CPUS=${GTA_CLUSTER_CPUS:-8}
NODE_MEM_MB=${GTA_CLUSTER_MEM_MB:-262144}

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

alive() { [[ -s $1 ]] && kill -0 "$(head -1 "$1")" 2>/dev/null; }

# free_ports "TAKEN..." NAME...: NAME=port for each name, all different and none of TAKEN: every socket stays
# bound until all are chosen (ports asked for one at a time can come back equal, since each is free again once
# its socket closes)
free_ports() {
  python3 -c '
import socket, sys
taken, names, held, chosen = set(map(int, sys.argv[1].split())), sys.argv[2:], [], []
while len(chosen) < len(names):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
    if s.getsockname()[1] not in taken:
        chosen.append(s.getsockname()[1])
for name, port in zip(names, chosen):
    print(f"{name}={port}")' "$@"
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s
wait_for() {
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || return 1
    sleep 0.2
  done
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's maintainer scripts try to start the services; nothing here has an init system to do it with
  apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/log/apt.log" 2>&1 || {
    apt-get update -q >>"$DIR/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/log/apt.log" 2>&1
  } || die "apt-get install ${missing[*]} failed: see $DIR/log/apt.log"
}

# --- ports, chosen once and kept in $DIR/ports -----------------------------------------------------------------
# The names missing from the file are chosen together, apart from those it holds: all of them at the first start;
# N1_PORT and N2_PORT alone in a directory whose cluster was started before the partition two existed.
ports() {
  local missing=() name
  touch "$DIR/ports"
  for name in CTLD_PORT SLURMD_PORT N1_PORT N2_PORT DBD_PORT MARIADB_PORT PG_PORT MLFLOW_PORT; do
    grep -q "^$name=" "$DIR/ports" || missing+=("$name")
  done
  if ((${#missing[@]})); then
    free_ports "$(cut -d= -f2 "$DIR/ports" | tr '\n' ' ')" "${missing[@]}" >>"$DIR/ports"
  fi
  # shellcheck disable=SC1091
  source "$DIR/ports"
}

write_configs() {
  local etc=$DIR/etc
  cat >"$etc/slurm.conf" <<EOF
# a cluster on 127.0.0.1, written by scripts/cluster.sh: its nodes are slurmd daemons on this host
ClusterName=gta
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state/slurmctld
# one spool directory, PID file and log per slurmd (%n: the node's name)
SlurmdSpoolDir=$DIR/state/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# no cgroups (no systemd): processes are tracked through /proc, tasks are not bound to cores
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# the scheduler looks for work every 2 s (30 s and 60 s by default), so that a requeued job starts again soon
SchedulerParameters=bf_interval=2,sched_interval=2
# seconds between the pre-kill SIGTERM and SIGKILL at a time-out, a preemption or a requeue
KillWait=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket for the connection to slurmdbd (AuthInfo covers the other connections)
AccountingStoragePass=$DIR/munge/munge.socket.2
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
# two nodes on this host, told apart by their slurmd's port: a job of partition two can span two nodes. Their
# names resolve nowhere: SLURM reaches them by NodeAddr, and a job of several nodes finds its rendezvous address
# in SLURM_LAUNCH_NODE_IPADDR, not in their names (gta/engine/distributed.py)
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=n1,n2 MaxTime=INFINITE State=UP
EOF
  cat >"$etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
}

# --- the daemons ----------------------------------------------------------------------------------------------
start_munge() {
  alive "$DIR/run/munged.pid" && return
  [[ -s $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
                                     chmod 400 "$DIR/munge/munge.key"; }
  chmod 755 "$DIR/munge"  # clients reach the socket only through a directory others may enter
  munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  wait_for 10 munge test -S "$DIR/munge/munge.socket.2" || die "munged did not start: $DIR/log/munged.log"
}

start_mariadb() {
  alive "$DIR/run/mariadb.pid" && return
  if [[ ! -d $DIR/mariadb/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mariadb" --user=root --skip-test-db \
      --auth-root-authentication-method=normal >"$DIR/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
  fi
  # a throw-away database reached only from 127.0.0.1: no passwords
  setsid mariadbd --no-defaults --datadir="$DIR/mariadb" --user=root --bind-address=127.0.0.1 \
    --port="$MARIADB_PORT" --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" \
    --skip-grant-tables --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb test -S "$DIR/run/mariadb.sock" || die "MariaDB did not start: $DIR/log/mariadb.log"
}

start_slurmdbd() {
  alive "$DIR/run/slurmdbd.pid" && return
  SLURM_CONF=$DIR/etc/slurm.conf slurmdbd
  wait_for 60 slurmdbd sacctmgr -n show cluster || die "slurmdbd did not answer: $DIR/log/slurmdbd.log"
  sacctmgr -i -Q add cluster gta >/dev/null 2>&1 || true  # exists already on a restart
}

start_slurm() {
  if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld
  fi
  local node
  for node in "${NODES[@]}"; do  # named, since the three share this host's name
    alive "$DIR/run/slurmd-$node.pid" || slurmd -N "$node"
  done
  # every node idle, or running jobs already (a restart while jobs run)
  wait_for 30 "the nodes" nodes_up \
    || die "the nodes did not all come up: $(sinfo -h -N -o '%N %t' | tr '\n' ' ')($DIR/log/slurmctld.log, $DIR/log/slurmd-*.log)"
}

nodes_up() {
  local states; states=$(sinfo -h -N -o %t) && [[ -n $states ]] && ! grep -vqxE 'idle|mix|alloc' <<<"$states"
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; }

start_postgres() {
  [[ -s $DIR/postgres/postmaster.pid ]] && kill -0 "$(head -1 "$DIR/postgres/postmaster.pid")" 2>/dev/null && return
  local bin; bin=$(pg_bin)
  # PostgreSQL refuses to run as root: its files belong to its system user
  if [[ ! -s $DIR/postgres/PG_VERSION ]]; then
    install -d -o postgres -g postgres -m 700 "$DIR/postgres"
    runuser -u postgres -- "$bin/initdb" -D "$DIR/postgres" -U postgres --auth=trust >"$DIR/log/initdb.log" 2>&1 \
      || die "initdb failed: $DIR/log/initdb.log"
  fi
  install -d -o postgres -g postgres "$DIR/run/pg"
  touch "$DIR/log/postgres.log"; chown postgres "$DIR/log/postgres.log"
  runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/postgres" -l "$DIR/log/postgres.log" -w -t 60 start \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $DIR/run/pg" >/dev/null \
    || die "PostgreSQL did not start: $DIR/log/postgres.log"
  "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" \
    | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres mlflow
}

tracking_uri() { echo "http://127.0.0.1:$MLFLOW_PORT"; }

healthy() {  # the tracking server answers (curl may be missing on a fresh machine; python3 is not)
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
    "$(tracking_uri)" 2>/dev/null
}

start_mlflow() {
  alive "$DIR/run/mlflow.pid" && return
  [[ -x $VENV/bin/mlflow ]] || die "no $VENV/bin/mlflow: run make setup first"
  "$VENV/bin/python" -c "import psycopg2" 2>/dev/null \
    || die "psycopg2 is missing from $VENV (pip install -e '.[dev]')"
  local t0=$SECONDS
  # its own process group, so that stopping it also stops the web server's worker processes
  # MLflow's job runner (about ten huey processes, 1.5 GB, serving GenAI features) is left off: nothing here uses
  # it, and its processes outlive a killed server
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$VENV/bin/mlflow" server --backend-store-uri "postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow" \
    --artifacts-destination "$DIR/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    </dev/null >>"$DIR/log/mlflow.log" 2>&1 &
  echo $! >"$DIR/run/mlflow.pid"
  local pid=$!
  until healthy; do  # MLflow creates its tables at the first start
    kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < 180)) || break
    sleep 0.5
  done
  healthy \
    || die "the MLflow server did not answer at $(tracking_uri): $DIR/log/mlflow.log"
}

print_env() {
  echo "SLURM_CONF=$DIR/etc/slurm.conf"
  echo "GTA_CLUSTER_TRACKING_URI=$(tracking_uri)"
}

# --- stopping, by the recorded PIDs ----------------------------------------------------------------------------
stop_pid() {  # stop_pid NAME PIDFILE [group]
  local name=$1 file=$2 pid target
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(head -1 "$file"); target=$pid
  [[ ${3:-} == group ]] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name ($pid) still running after 10 s: SIGKILL"; kill -KILL -- "$target" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop_all() {
  [[ -d $DIR ]] || return 0
  export SLURM_CONF=$DIR/etc/slurm.conf
  if alive "$DIR/run/slurmctld.pid"; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    [[ -z $jobs ]] || { scancel --full $jobs 2>/dev/null || true; sleep 1; }
  fi
  stop_pid mlflow "$DIR/run/mlflow.pid" group
  local file
  for file in "$DIR"/run/slurmd*.pid; do  # slurmd.pid: the one slurmd of a cluster started before partition two
    stop_pid slurmd "$file"
  done
  stop_pid slurmctld "$DIR/run/slurmctld.pid"
  stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
  stop_pid mariadb "$DIR/run/mariadb.pid"
  stop_pid munged "$DIR/run/munged.pid"
  if [[ -s $DIR/postgres/postmaster.pid ]]; then
    # the fast shutdown of PostgreSQL's documentation: SIGINT to the postmaster
    local pid; pid=$(head -1 "$DIR/postgres/postmaster.pid")
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}

# --- commands ---------------------------------------------------------------------------------------------------
case ${1:-status} in
start)
  [[ $(id -u) == 0 ]] || die "needs root: SLURM's daemons and the package installation (run it with sudo)"
  start=$SECONDS
  mkdir -p "$DIR"/{etc,log,run,munge,state/slurmctld,mlartifacts} "${NODES[@]/#/$DIR/state/slurmd/}"
  install_packages
  ports
  write_configs
  export SLURM_CONF=$DIR/etc/slurm.conf
  took=()
  for part in munge mariadb slurmdbd slurm postgres mlflow; do
    t=$SECONDS; "start_$part"; took+=("$part $((SECONDS - t)) s")
  done
  say "up in $((SECONDS - start)) s ($(IFS=,; echo "${took[*]}" | sed 's/,/, /g')) under $DIR"
  say "for sbatch, squeue, sacct and the tests, export:"
  print_env | sed 's/^/export /'
  ;;
env)
  [[ -s $DIR/ports ]] || die "not started: scripts/cluster.sh start (as root)"
  ports
  alive "$DIR/run/slurmctld.pid" || die "slurmctld is not running: scripts/cluster.sh start"
  alive "$DIR/run/mlflow.pid" || die "the MLflow server is not running: scripts/cluster.sh start"
  print_env
  ;;
status)
  [[ -s $DIR/ports ]] || { say "not started ($DIR)"; exit 1; }
  ports; export SLURM_CONF=$DIR/etc/slurm.conf
  for d in munged mariadb slurmdbd slurmctld "${NODES[@]/#/slurmd-}" mlflow; do
    if alive "$DIR/run/$d.pid"; then echo "$d running ($(head -1 "$DIR/run/$d.pid"))"; else echo "$d stopped"; fi
  done
  sinfo 2>&1 || true
  if healthy; then echo "MLflow at $(tracking_uri): OK"; else echo "MLflow: no answer"; fi
  ;;
stop)
  stop_all
  say "stopped ($DIR kept)"
  ;;
clean)
  stop_all
  rm -rf "$DIR"
  say "removed $DIR"
  ;;
*)
  die "usage: $0 start|env|status|stop|clean"
  ;;
esac
