#!/usr/bin/env bash
# Generic multi-node launcher: run this once per process (one per host, or one
# per accelerator), each with its own rank. Every process runs the same
# `unlearn-jax` command; jax.distributed joins them into one job.
#
#   COORDINATOR=10.0.0.1:12355 NUM_PROCESSES=4 PROCESS_ID=$RANK \
#     launch/multinode.sh unlearn --config configs/esd_x.py --workdir /shared/run
#
# torchrun-style variables work too: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK.
# `launch/multinode.sh selfcheck` runs a cross-process sum instead of a command.
# PYTHON selects the interpreter (default: python3 on PATH).
set -euo pipefail

coordinator=${COORDINATOR:-}
if [[ -z $coordinator && -n ${MASTER_ADDR:-} ]]; then
  coordinator="${MASTER_ADDR}:${MASTER_PORT:-12355}"
fi
num_processes=${NUM_PROCESSES:-${WORLD_SIZE:-}}
process_id=${PROCESS_ID:-${RANK:-}}

if [[ -z $coordinator || -z $num_processes || -z $process_id ]]; then
  echo "multinode.sh: set COORDINATOR=host:port, NUM_PROCESSES and PROCESS_ID" \
       "(or MASTER_ADDR/MASTER_PORT, WORLD_SIZE, RANK)" >&2
  exit 2
fi
if (( $# == 0 )); then
  echo "multinode.sh: give the unlearn-jax command to run (e.g. unlearn --config ...)," \
       "or 'selfcheck'" >&2
  exit 2
fi

export UNLEARN_JAX_COORDINATOR=$coordinator
export UNLEARN_JAX_NUM_PROCESSES=$num_processes
export UNLEARN_JAX_PROCESS_ID=$process_id
python=${PYTHON:-python3}

if [[ $1 == selfcheck ]]; then
  exec "$python" -m unlearn_jax.distributed
fi
exec "$python" -m unlearn_jax.cli "$@"
