#!/usr/bin/env bash
# Train on one machine with several GPUs.
#
#   launch/local_multi_gpu.sh --config=configs/qwen_vl.py:3b --config.workdir=/runs/3b ...
#   PROCESSES=8 launch/local_multi_gpu.sh --config=configs/qwen_vl.py:3b ...
#
# Arguments are flags for `python -m emor3_jax.train`; the mesh's product must equal the
# number of GPUs (all processes together).
#   PROCESSES=1 (default, recommended): one process owns every GPU; nothing to coordinate.
#   PROCESSES=N: N processes, each owning GPUS/N GPUs (CUDA_VISIBLE_DEVICES), joined through
#     JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (emor3_jax.core.multihost).
#     The same layout as a multi-node run, on one box: a way to test it.
# Settings (environment):
#   PROCESSES     processes to start                          (1)
#   GPUS          GPUs to use, ids 0..GPUS-1                  (all, from nvidia-smi)
#   PORT          coordinator port on localhost               (12355)
#   PYTHON        interpreter                                 (.venv/bin/python if present, else python3)
#   LOG_DIR       where processes 1..N-1 write their output    (workdir/launch-logs)
#   MEM_FRACTION  XLA_PYTHON_CLIENT_MEM_FRACTION per process  (0.9)
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: [PROCESSES=N] $0 --config=configs/qwen_vl.py:3b [--config.x=y ...]" >&2
  exit 2
fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
PROCESSES=${PROCESSES:-1}
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-workdir/launch-logs}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}

if [[ $PROCESSES == 1 ]]; then
  if [[ -n ${GPUS:-} ]]; then export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1))); fi
  echo "one process, GPUs ${CUDA_VISIBLE_DEVICES:-all}: $PYTHON -m emor3_jax.train $*"
  exec "$PYTHON" -m emor3_jax.train "$@"
fi
if [[ -z ${GPUS:-} ]]; then
  GPUS=$(nvidia-smi -L | grep -c '^GPU ')
fi

if ((PROCESSES < 1 || GPUS % PROCESSES)); then
  echo "PROCESSES=$PROCESSES must be >= 1 and divide GPUS=$GPUS" >&2
  exit 2
fi
per=$((GPUS / PROCESSES))
mkdir -p "$LOG_DIR"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < PROCESSES; i++)); do
  devices=$(seq -s, $((i * per)) $((i * per + per - 1)))
  echo "process $i of $PROCESSES: GPUs $devices, coordinator localhost:$PORT"
  cmd=(env CUDA_VISIBLE_DEVICES="$devices" JAX_COORDINATOR_ADDRESS="localhost:$PORT"
    JAX_NUM_PROCESSES="$PROCESSES" JAX_PROCESS_ID="$i" "$PYTHON" -m emor3_jax.train "$@")
  if ((i == 0)); then "${cmd[@]}" & else "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 & fi
  pids+=($!)
done
echo "processes 1..$((PROCESSES - 1)) log to $LOG_DIR/process_<i>.log"

# The first process to fail stops the others (they would wait on it in a collective).
status=0
for ((n = 0; n < PROCESSES; n++)); do
  if ! wait -n; then
    status=1
    echo "a training process failed; stopping the others" >&2
    stop_all
    break
  fi
done
wait || true
exit "$status"
