#!/usr/bin/env bash
# TPU pod launcher: copy this checkout to every worker of a TPU VM, set up the
# environment there (idempotent: a second run reuses it), and run the same
# unlearn-jax command on all workers at once.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh unlearn \
#       --config configs/esd_x.py --workdir gs://my-bucket/runs/esd_x
#
# Options (environment): TPU_NAME, ZONE (required), PROJECT, REMOTE_DIR
# (default ~/unlearn_jax), DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
if (( $# == 0 )); then
  echo "tpu_pod.sh: give the unlearn-jax command (e.g. unlearn --config ...)" >&2
  exit 2
fi
remote_dir=${REMOTE_DIR:-unlearn_jax}
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_args=(--zone "$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  gcloud_args+=(--project "$PROJECT")
fi

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

archive=$(mktemp -t unlearn_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
# Tracked files only: no local venvs, checkpoints or caches travel.
run git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:unlearn_jax.tar.gz" "${gcloud_args[@]}"

setup="set -e; mkdir -p $remote_dir; tar -xzf unlearn_jax.tar.gz -C $remote_dir; cd $remote_dir;
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi;
.venv/bin/pip install -q -e . 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --command "$setup"

quoted=$(printf '%q ' "$@")
command="cd $remote_dir && UNLEARN_JAX_DISTRIBUTED=auto .venv/bin/python -m unlearn_jax.cli $quoted"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --command "$command"
