#!/usr/bin/env bash
# Train clip_jax on a Cloud TPU VM slice (single host or pod) with gcloud.
# Run `launch/tpu_pod.sh --help` for usage; README.md, "Launching multi-host runs", has examples.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [flags] [-- TRAINER ARGS]

commands:
  up        create (or reuse) the slice, install, train: the one command to (re)start a run
  create    create the slice unless it exists (a preempted one is deleted and created again,
            a stopped one started)
  install   copy this working tree (or clone --repo) to every worker, pip install it with jax[tpu]
  train     start `python -m clip_jax.train --workdir WORKDIR --distributed=on TRAINER ARGS` on
            every worker in the background (nohup, log in ~/clip_jax_train.log), then follow the logs
  logs      follow the trainer log of every worker (Ctrl-C stops following, not training)
  stop      SIGTERM the trainer on every worker (it saves a checkpoint); SIGKILL after --grace s
  delete    delete the slice

flags:
  --name NAME               TPU VM name (always required)
  --zone ZONE               e.g. us-central2-b (always required)
  --project PROJECT         default: gcloud's configured project
  --accelerator_type TYPE   e.g. v4-32, v5litepod-64 (create, up)
  --version RUNTIME         TPU software version, e.g. tpu-ubuntu2204-base (create, up)
  --spot | --preemptible    create a Spot / preemptible slice
  --repo URL[@REF]          install: git clone URL (at branch/tag/commit REF) instead of copying the tree
  --extras LIST             install: pip extras of clip_jax besides gcs (always), e.g. tfdata
  --workdir gs://BUCKET/DIR train, up: run directory; must be a bucket every worker can reach
  --worker all|N            workers for install/train/logs/stop (default: all)
  --grace SECONDS           stop: how long to wait for the checkpoint before SIGKILL (default 120)
  --detach                  train, up: start and return instead of following the logs
  --dry-run                 print the commands (shell-quoted, one per line) instead of running them
  -h, --help                this message

Everything after `--` goes to the trainer unchanged (e.g. --config configs/clip.py:ViT-B/16
--config.batch_size=4096). Running the same `up` again resumes from the workdir's latest checkpoint.
EOF
}

die() { printf 'tpu_pod.sh: error: %s\n' "$*" >&2; exit 2; }

# One shell word: bare when safe, else single-quoted (POSIX; Python's shlex.split reads it back).
q() {
  local s=$1 sq="'\\''"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then printf '%s' "$s"; else printf "'%s'" "${s//\'/$sq}"; fi
}
join_q() { local out='' a; for a in "$@"; do out+="${out:+ }$(q "$a")"; done; printf '%s' "$out"; }

# Runs a command, or with --dry-run prints it (the echo to stderr shows what a real run does).
run() {
  if (( DRY_RUN )); then join_q "$@"; echo; else printf '+ %s\n' "$(join_q "$@")" >&2; "$@"; fi
}
note() { if (( DRY_RUN )); then printf '# %s\n' "$*"; else printf 'tpu_pod.sh: %s\n' "$*" >&2; fi; }

# ---- arguments -------------------------------------------------------------------------------
COMMAND='' NAME='' ZONE='' PROJECT='' ACCEL='' VERSION='' PROVISIONING='' REPO='' EXTRAS=''
WORKDIR='' WORKER='all' GRACE=120 DETACH=0 DRY_RUN=0
TRAINER_ARGS=()
while (( $# )); do
  arg=$1; shift
  case $arg in
    --) TRAINER_ARGS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; continue ;;
    --spot) PROVISIONING=--spot; continue ;;
    --preemptible) PROVISIONING=--preemptible; continue ;;
    --detach) DETACH=1; continue ;;
    -*) ;;
    *) [[ -z $COMMAND ]] || die "unexpected argument '$arg' (trainer arguments go after --)"
       COMMAND=$arg; continue ;;
  esac
  key=${arg%%=*}
  if [[ $arg == *=* ]]; then value=${arg#*=}
  elif (( $# )); then value=$1; shift
  else value=''; fi
  k=${key#--}
  case ${k//-/_} in  # --accelerator-type works as well as --accelerator_type
    name) NAME=$value ;;
    zone) ZONE=$value ;;
    project) PROJECT=$value ;;
    accelerator_type) ACCEL=$value ;;
    version) VERSION=$value ;;
    repo) REPO=$value ;;
    extras) EXTRAS=$value ;;
    workdir) WORKDIR=$value ;;
    worker) WORKER=$value ;;
    grace) GRACE=$value ;;
    *) die "unknown flag '$key' (see --help; trainer arguments go after --)" ;;
  esac
  [[ -n $value ]] || die "$key needs a value"
done

case $COMMAND in
  up|create|install|train|logs|stop|delete) ;;
  '') usage >&2; die 'no command given (up, create, install, train, logs, stop or delete)' ;;
  *) die "unknown command '$COMMAND' (up, create, install, train, logs, stop or delete)" ;;
esac
[[ -n $NAME ]] || die '--name is required (the TPU VM name)'
[[ -n $ZONE ]] || die '--zone is required (e.g. --zone us-central2-b)'
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a worker number, not '$WORKER'"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, not '$GRACE'"
if [[ $COMMAND == up || $COMMAND == create ]]; then
  [[ -n $ACCEL ]] || die '--accelerator_type is required to create the slice (e.g. --accelerator_type v4-32)'
  [[ -n $VERSION ]] || die '--version is required to create the slice (e.g. --version tpu-ubuntu2204-base)'
fi
if [[ $COMMAND == up || $COMMAND == train ]]; then
  [[ -n $WORKDIR ]] || die '--workdir gs://BUCKET/DIR is required to train (checkpoints and logs go there)'
  [[ $WORKDIR == gs://?* ]] || die "--workdir must be a gs:// bucket path, not '$WORKDIR': every worker writes \
its checkpoint shards there and all of them must see the same files"
  for a in ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}; do
    [[ $a == --workdir || $a == --workdir=* ]] && die 'give --workdir to tpu_pod.sh (before --), not in the trainer arguments'
  done
  has_config=0
  for a in ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}; do [[ $a == --config || $a == --config=* ]] && has_config=1; done
  (( has_config )) || die 'the trainer needs --config: put it after --, e.g. -- --config configs/clip.py:ViT-B/16'
elif (( ${#TRAINER_ARGS[@]} )); then
  die "'$COMMAND' takes no trainer arguments (only train and up do)"
fi
if (( ! DRY_RUN )) && ! command -v gcloud >/dev/null 2>&1; then
  die 'gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk), or use --dry-run'
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
# Remote layout, in the login user's home on every worker.
CODE='~/clip_jax' VENV='~/clip_jax_venv' LOG='~/clip_jax_train.log' PIDFILE='~/clip_jax_train.pid'
PY="$VENV/bin/python"

ssh_all() { run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$WORKER" --command="$1"; }
# Remote: fail on a worker whose trainer is still running (install and train would disturb it).
NOT_RUNNING="if [ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then \
echo \"a trainer is already running on \$(hostname); run: launch/tpu_pod.sh stop\" >&2; exit 1; fi"

# ---- commands --------------------------------------------------------------------------------
do_create() {
  local create=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ -z $PROVISIONING ]] || create+=("$PROVISIONING")
  local delete=("${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet)
  local describe=("${TPU[@]}" describe "$NAME" "${WHERE[@]}" '--format=value(state,acceleratorType)')
  local start=("${TPU[@]}" start "$NAME" "${WHERE[@]}")
  if (( DRY_RUN )); then
    run "${describe[@]}"
    note "if the describe fails (no such slice):"
    run "${create[@]}"
    note "if it says PREEMPTED or TERMINATED: delete, then the create above"
    run "${delete[@]}"
    note "if it says STOPPED:"
    run "${start[@]}"
    note "if it exists with another accelerator type: stop with an error"
    return
  fi
  local info state type
  if info=$(run "${describe[@]}" 2>/dev/null); then
    read -r state type <<<"$info"
    if [[ -n $type && $type != "$ACCEL" ]]; then
      die "slice '$NAME' exists as $type, not $ACCEL: delete it or choose another --name"
    fi
    case $state in
      PREEMPTED|TERMINATED)
        note "slice '$NAME' is $state: deleting it and creating it again"
        run "${delete[@]}"; run "${create[@]}" ;;
      STOPPED) note "slice '$NAME' is stopped: starting it"; run "${start[@]}" ;;
      *) note "reusing slice '$NAME' ($type, $state)" ;;
    esac
  else
    run "${create[@]}"
  fi
}

do_install() {
  local fetch
  if [[ -n $REPO ]]; then
    local url=$REPO ref=''
    # URL@REF: REF is what follows the last '@', unless that holds a ':' (then the '@' is git@host:...).
    if [[ $REPO == *@* && ${REPO##*@} != *:* ]]; then url=${REPO%@*}; ref=${REPO##*@}; fi
    fetch="rm -rf $CODE && git clone --quiet $(q "$url") $CODE"
    [[ -z $ref ]] || fetch+=" && git -C $CODE checkout --quiet $(q "$ref")"
  else
    local tarball="${TMPDIR:-/tmp}/clip_jax-$NAME.tar.gz"
    run tar -C "$ROOT" -czf "$tarball" --exclude=.git --exclude=.venv --exclude=venv --exclude=runs \
      --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache .
    run "${TPU[@]}" scp "$tarball" "$NAME:clip_jax.tar.gz" "${WHERE[@]}" --worker="$WORKER"
    fetch="rm -rf $CODE && mkdir -p $CODE && tar -xzf ~/clip_jax.tar.gz -C $CODE"
  fi
  # gcs: the workdir is a bucket (checkpoints and metrics through etils.epath / gcsfs).
  local pkg='.[gcs]'
  [[ -z $EXTRAS ]] || pkg=".[gcs,$EXTRAS]"
  # A venv of its own (installing python3-venv where the image lacks it), so pip never meets
  # the system Python's packages.
  ssh_all "set -e; $NOT_RUNNING; $fetch; \
if [ ! -x $PY ]; then rm -rf $VENV; python3 -m venv $VENV || { sudo apt-get update -qq && \
sudo apt-get install -y -qq python3-venv && python3 -m venv $VENV; }; fi; \
$PY -m pip install -q --upgrade pip; cd $CODE && $PY -m pip install -q -e $(q "$pkg") 'jax[tpu]'"
}

do_train() {
  # --distributed=on: JAX's cluster detection finds the slice's workers from the TPU VM metadata.
  # A --distributed among the trainer arguments comes later and wins.
  local train
  train="$PY $(join_q -m clip_jax.train --workdir="$WORKDIR" --distributed=on "${TRAINER_ARGS[@]}")"
  ssh_all "set -e; $NOT_RUNNING; cd $CODE; \
echo \"=== \$(date -u +%FT%TZ) start on \$(hostname)\" >> $LOG; \
nohup $train >> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
  if (( DETACH )); then
    note "started; follow with: launch/tpu_pod.sh logs --name $NAME --zone $ZONE"
  else
    do_logs
  fi
}

do_logs() {
  ssh_all "tail -n 100 -F $LOG | sed -u \"s/^/[\$(hostname)] /\""
}

do_stop() {
  ssh_all "if [ -f $PIDFILE ]; then pid=\$(cat $PIDFILE); \
if kill -TERM \"\$pid\" 2>/dev/null; then for i in \$(seq $GRACE); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; \
if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): no exit after $GRACE s, sending SIGKILL\" >&2; kill -KILL \"\$pid\"; fi; fi; \
rm -f $PIDFILE; fi"
}

do_delete() {
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

case $COMMAND in
  up) do_create; do_install; do_train ;;
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
