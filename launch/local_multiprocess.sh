#!/usr/bin/env bash
# Run the main job as N local JAX processes (gloo collectives on CPU), e.g.
#   launch/local_multiprocess.sh 2 4 --config=configs/toy.py:fast --workdir=runs/mp
# N processes x D local CPU devices each; every rank runs the same command.
set -euo pipefail
n=${1:?number of processes}; d=${2:?devices per process}; shift 2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((r = 0; r < n; r++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$d" python -m didr_jax.main "$@" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$r" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
