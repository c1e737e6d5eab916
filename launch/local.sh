#!/usr/bin/env bash
# Runs N trainer processes on this machine, talking over loopback with CPU collectives: the
# multi-host code path (jax.distributed, per-process input shards, multi-process checkpoints)
# without a cluster.
#
#   launch/local.sh [--dry-run] [--devices_per_process K] [--port P] [--python PY] N TRAINER_ARGS...
#
#   N                       processes to start (process ids 0..N-1)
#   --devices_per_process   fake CPU devices per process (default 8/N, at least 1)
#   --port                  coordinator port on 127.0.0.1 (default: a free one)
#   --python                interpreter (default: python, or $PYTHON)
#   --dry-run               print the N commands instead of running them
#
# Example: two processes train the digits job on a 2x4 (data x fsdp) mesh of 8 CPU devices:
#   launch/local.sh 2 --config configs/clip_digits.py --workdir runs/digits2 \
#       --config.mesh.data=2 --config.mesh.fsdp=4
#
# Process 0's output is shown here; every process logs to WORKDIR/logs/process_<i>.log. When one
# process fails (or is killed), the others are stopped too, as a cluster scheduler would, and
# the script exits with the failed process's status; run the same command again to resume from
# the last checkpoint. SIGTERM/SIGINT are forwarded to every process (they checkpoint and exit).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
devices=''
port=''
python_bin="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --devices_per_process) devices="$2"; shift 2 ;;
    --devices_per_process=*) devices="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --python) python_bin="$2"; shift 2 ;;
    --python=*) python_bin="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: the first argument must be the number of processes N (a positive integer), got '${1:-}'" >&2
  usage >&2
  exit 2
fi
n="$1"; shift
if [[ -z "$devices" ]]; then
  devices=$(( 8 / n )); (( devices >= 1 )) || devices=1
fi
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices_per_process must be a positive integer, got '$devices'" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  if (( dry_run )); then
    port=12355
  else
    port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi

# The workdir (for the logs) from the trainer arguments.
workdir=''
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --workdir) workdir="${args[$((i + 1))]:-}" ;;
    --workdir=*) workdir="${args[$i]#*=}" ;;
  esac
done
if [[ -z "$workdir" ]]; then
  echo "local.sh: pass the trainer's --workdir (the logs go to WORKDIR/logs)" >&2
  exit 2
fi

# Our device count replaces any the caller's XLA_FLAGS had.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' | xargs)"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

command_for() {  # the argv of process $1
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$python_bin" -m clip_jax.train "$@"
       --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$proc")
}

if (( dry_run )); then
  for ((proc = 0; proc < n; proc++)); do
    command_for "$@"
    printf '%q ' "${cmd[@]}"; printf '> %q 2>&1\n' "$workdir/logs/process_$proc.log"
  done
  exit 0
fi

mkdir -p "$workdir/logs"
pids=()
stop_all() {
  local signal="$1"
  for pid in "${pids[@]}"; do kill "-$signal" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM INT
for ((proc = 0; proc < n; proc++)); do
  command_for "$@"
  log="$workdir/logs/process_$proc.log"
  if (( proc == 0 )); then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=($!)
done

status=0
live=("${pids[@]}")
while (( ${#live[@]} > 0 )); do
  finished=''
  if wait -n -p finished "${live[@]}"; then
    code=0
  else
    code=$?
  fi
  [[ -z "$finished" ]] && break  # interrupted by a trapped signal: wait for the rest below
  next=()
  for pid in "${live[@]}"; do [[ "$pid" != "$finished" ]] && next+=("$pid"); done
  live=("${next[@]}")
  if (( code != 0 && status == 0 )); then
    status=$code
    for ((proc = 0; proc < n; proc++)); do
      [[ "${pids[$proc]}" == "$finished" ]] && echo "local.sh: process $proc exited with status $code; stopping the others (log: $workdir/logs/process_$proc.log)" >&2
    done
    stop_all KILL
  fi
done
wait 2>/dev/null || true
exit "$status"
