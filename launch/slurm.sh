#!/usr/bin/env bash
# Submits launch/slurm.sbatch: one trainer process per GPU on --nodes nodes.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm.sh [--dry-run] [--nodes N] [--gpus_per_node G] [--partition P] [--time T]
                       [--account A] -- --config ... --workdir DIR [trainer args]

Runs `sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G [--partition=P] [--time=T]
[--account=A] launch/slurm.sbatch TRAINER ARGS` (defaults: 1 node, 8 GPUs per node).
--dry-run prints that command instead. Other sbatch options: call sbatch directly.
EOF
}

die() { printf 'slurm.sh: error: %s\n' "$*" >&2; exit 2; }
q() {
  local s=$1 sq="'\\''"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then printf '%s' "$s"; else printf "'%s'" "${s//\'/$sq}"; fi
}

DRY_RUN=0 NODES=1 GPUS=8
EXTRA=()
while (( $# )); do
  arg=$1; shift
  case $arg in
    --) break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run|--dry_run) DRY_RUN=1; continue ;;
    --*) ;;
    *) die "unexpected argument '$arg' (trainer arguments go after --)" ;;
  esac
  key=${arg%%=*}
  if [[ $arg == *=* ]]; then value=${arg#*=}; elif (( $# )); then value=$1; shift; else value=''; fi
  [[ -n $value ]] || die "$key needs a value"
  k=${key#--}
  case ${k//-/_} in
    nodes) NODES=$value ;;
    gpus_per_node) GPUS=$value ;;
    partition) EXTRA+=(--partition="$value") ;;
    time) EXTRA+=(--time="$value") ;;
    account) EXTRA+=(--account="$value") ;;
    *) die "unknown flag '$key' (see --help; trainer arguments go after --)" ;;
  esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, not '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive number, not '$GPUS'"
(( $# )) || die 'trainer arguments missing: add -- --config ... --workdir DIR'
has_workdir=0 has_config=0
for a in "$@"; do
  [[ $a == --workdir || $a == --workdir=* ]] && has_workdir=1
  [[ $a == --config || $a == --config=* ]] && has_config=1
done
(( has_workdir )) || die '--workdir DIR is required after -- (on a filesystem every node sees)'
(( has_config )) || die '--config is required after --, e.g. --config configs/clip.py:ViT-B/16'

SBATCH_FILE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm.sbatch"
CMD=(sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS"
     ${EXTRA[@]+"${EXTRA[@]}"} "$SBATCH_FILE" "$@")
if (( DRY_RUN )); then
  out=''
  for a in "${CMD[@]}"; do out+="${out:+ }$(q "$a")"; done
  printf '%s\n' "$out"
else
  command -v sbatch >/dev/null 2>&1 || die 'sbatch not found: run this on a SLURM login node (or use --dry-run)'
  exec "${CMD[@]}"
fi
