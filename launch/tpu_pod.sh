#!/usr/bin/env bash
# Run the main job on every worker of a Cloud TPU VM slice: the same command on all hosts, each
# calling jax.distributed.initialize() with auto-detection (--multihost).
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh setup           # once: copy the repo, install
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh run --config=configs/sdxl.py \
#       --workdir=/mnt/shared/runs/sdxl-didr --config.model.reference=/mnt/shared/models/sdxl-base ...
#   TPU=... ZONE=... launch/tpu_pod.sh stop                          # SIGTERM: every host saves, exits 0
#
# --workdir and every model/prompt path must name the same files on every host (a Filestore/NFS
# mount or a gcsfuse-mounted bucket): checkpoints are written collectively by all processes.
# Rerunning `run` with the same arguments resumes from the latest checkpoint.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REMOTE_DIR=${REMOTE_DIR:-didr_jax}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command "$1"
}
cmd=${1:?usage: launch/tpu_pod.sh setup|run|stop [main flags...]}; shift
case "$cmd" in
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    gcloud compute tpus tpu-vm scp --recurse "$here" "$TPU:~/$REMOTE_DIR" --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    # requirements.txt pins the CPU jaxlib; the TPU runtime comes from jax[tpu] at the same version
    ssh_all "cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
      && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
    ;;
  run)
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$REMOTE_DIR && nohup .venv/bin/python -m didr_jax.main --multihost $args \
      > ~/didr_main.log 2>&1 < /dev/null &"
    echo "started on all workers; logs in ~/didr_main.log on each (process 0 writes the metrics)"
    ;;
  stop)
    ssh_all "pkill -TERM -f '[d]idr_jax[.]main' || true"
    ;;
  *)
    echo "unknown command $cmd: use setup, run or stop" >&2
    exit 2
    ;;
esac
