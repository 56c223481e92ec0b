#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), put this checkout on every worker,
# run the same train command on all workers at once. jax.distributed finds the other
# workers itself (emor3_jax.core.multihost, TPU auto-detection).
#
#   TPU_NAME=emor3-7b ACCELERATOR=v5p-64 ZONE=us-east5-a launch/tpu_vm.sh \
#       --config=configs/qwen_vl.py:7b --config.mesh="[('data',1),('fsdp',8),('tensor',4)]" \
#       --config.hf_path=/mnt/ckpt/Qwen2.5-VL-7B-Instruct --config.workdir=gs://bucket/runs/7b ...
#
# Arguments are flags for `python -m emor3_jax.train`, passed through quoted. The mesh's
# product must equal the slice's global device count: v5p-N has N/2 chips (= JAX devices),
# v6e-N has N. The smallest slices where every program of the step compiled and fits with the
# paper's batch (launch/README.md, "3b and 7b on v5p and v6e slices"; the default mesh, fsdp
# over every chip): 3b on v5p-8 or v6e-8, 7b on v5p-8 or v6e-16 (v6e: RUNTIME=v2-alpha-tpuv6e).
# Settings (environment):
#   TPU_NAME      slice name                                   (emor3)
#   ZONE          zone                                         (us-east5-a)
#   ACCELERATOR   accelerator type, used only when creating    (v5p-8)
#   RUNTIME       TPU software version, used only when creating (v2-alpha-tpuv5)
#   PROJECT       gcloud project                               (gcloud's default)
#   SPOT          1: create as a Spot slice                    (0)
#   REMOTE_DIR    checkout dir on each worker                  (emor3_jax, under $HOME)
#   SETUP         0: skip copy + pip install (already done)    (1)
#   DELETE_AFTER  1: delete the slice when training ends       (0)
set -euo pipefail

TPU_NAME=${TPU_NAME:-emor3}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REMOTE_DIR=${REMOTE_DIR:-emor3_jax}
SETUP=${SETUP:-1}
DELETE_AFTER=${DELETE_AFTER:-0}

if [[ $# -eq 0 ]]; then
  echo "usage: [TPU_NAME=..] [ACCELERATOR=..] $0 --config=configs/qwen_vl.py:3b [--config.x=y ...]" >&2
  exit 2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then where+=(--project="$PROJECT"); fi

run() {
  echo "+ $*"
  "$@"
}

if "${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format="value(state)" >/dev/null 2>&1; then
  echo "reusing TPU VM $TPU_NAME ($("${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format="value(acceleratorType,state)"))"
else
  create=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  if [[ $SPOT == 1 ]]; then create+=(--spot); fi
  run "${gc[@]}" create "$TPU_NAME" "${where[@]}" "${create[@]}"
fi

if [[ $SETUP == 1 ]]; then
  # The working tree as it is (tracked and untracked files, not what .gitignore ignores).
  tarball=$(mktemp -t emor3_jax.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$tarball")
  echo "copying $(du -h "$tarball" | cut -f1) checkout to every worker of $TPU_NAME"
  run "${gc[@]}" scp "$tarball" "$TPU_NAME":emor3_jax.tar.gz --worker=all "${where[@]}"
  setup_cmd="set -e; mkdir -p $REMOTE_DIR && tar -xzf emor3_jax.tar.gz -C $REMOTE_DIR && python3 -m venv ~/emor3-venv \
    && cd $REMOTE_DIR && ~/emor3-venv/bin/pip install -q -e '.[tpu]'"
  run "${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$setup_cmd"
fi

# Every worker runs the identical line; each flag is quoted for the remote shell.
train_cmd="cd $REMOTE_DIR && ~/emor3-venv/bin/python -m emor3_jax.train $(printf '%q ' "$@")"
status=0
run "${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$train_cmd" || status=$?
echo "training finished with exit status $status"

if [[ $DELETE_AFTER == 1 ]]; then
  run "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
exit "$status"
