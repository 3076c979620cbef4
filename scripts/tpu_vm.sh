#!/usr/bin/env bash
# Train im_jax on a Cloud TPU VM or pod slice: create, set up, train on every worker, follow
# the logs, fetch the results, delete. Docs: docs/multihost.md.
#
#   scripts/tpu_vm.sh [--dry-run] COMMAND [-- EXTRA TRAIN FLAGS]
#
# COMMAND: create | setup | train | logs | stop | fetch | delete | ssh
#   create  first `python -m im_jax.plan` here: the run's train step compiled for ACCELERATOR
#           (EXTRA flags after -- go to the plan: give it the overrides you will train with);
#           stops when it does not fit (SKIP_PLAN=1 creates anyway). Then the TPU VM / pod
#           slice (ACCELERATOR, RUNTIME, SPOT)
#   setup   on every worker: this repository (committed HEAD), the paper's data files, a venv
#           with requirements.txt's runtime part (gcsfs included) and jax[tpu]; with GCSFUSE=1
#           also the bucket mounted at MOUNT
#   train   the same command on every worker, in the background (survives ssh disconnects);
#           rerunning it resumes from the newest checkpoint in the workdir
#   logs    follows worker 0's log (the one process that writes metrics)
#   stop    SIGTERM to every worker's trainer: a checkpoint is saved, then they exit
#   fetch   copies the run folder (metrics, report inputs, hf/ export, checkpoints) to ./runs/
#   delete  deletes the TPU VM (the bucket is kept)
#   ssh     runs EXTRA (after --) as a shell command on every worker
#
# Multi-worker slices need BUCKET: checkpoints are written by all workers into one folder, so
# the workdir must be shared. The trainer writes to BUCKET/runs/RUN directly (orbax through
# tensorstore; the workdir lock is an object in the bucket, so a second run is refused across
# workers) and reads the model from BUCKET/models/MODEL (each worker copies it once to a local
# cache). GCSFUSE=1 mounts the bucket at MOUNT and uses MOUNT/runs/RUN instead (the older way:
# every write through FUSE, and a lock that cannot see other hosts).
# Without BUCKET, put the model at ~/models/MODEL on the worker yourself.
#
# Every setting below can be overridden from the environment, e.g.
#   TPU_NAME=lima ACCELERATOR=v5litepod-32 RUNTIME=v2-alpha-tpuv5-lite ZONE=us-west4-a \
#     BUCKET=gs://my-bucket scripts/tpu_vm.sh create
# --dry-run prints the commands instead of running them. Untested on a real TPU from here
# (no gcloud where it was written): read the printed commands before the first real run.
set -euo pipefail

# --- Settings ---------------------------------------------------------------------------
PROJECT="${PROJECT:-}"                      # empty: gcloud's configured project
ZONE="${ZONE:-us-central2-b}"               # v4 lives in us-central2-b; v5e e.g. us-west4-a
TPU_NAME="${TPU_NAME:-im-jax}"
ACCELERATOR="${ACCELERATOR:-v4-32}"         # v4-32: 16 chips on 4 workers; or v5litepod-32
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"   # v5e: v2-alpha-tpuv5-lite
SPOT="${SPOT:-0}"                           # 1: a spot slice (cheaper; preemption = SIGTERM)
BUCKET="${BUCKET:-}"                        # gs://NAME: runs/ and models/ live there
GCSFUSE="${GCSFUSE:-0}"                     # 1: mount BUCKET with gcsfuse, train in MOUNT
MOUNT="${MOUNT:-/mnt/im_jax}"               # where GCSFUSE=1 mounts BUCKET on every worker
REMOTE_DIR="${REMOTE_DIR:-im_jax}"          # the repository on each worker, under $HOME
MODEL="${MODEL:-Llama-2-7b-hf}"             # a HF folder under BUCKET/models/
CONFIG="${CONFIG:-configs/paper.py:lima,im,llama2_7b}"
RUN="${RUN:-lima_im_llama2_7b}"             # the run folder: BUCKET/runs/RUN
PYTHON="${PYTHON:-python3}"                 # on the workers (3.10+; 3.11 is what CI uses)

# --- Plumbing ---------------------------------------------------------------------------
DRY_RUN=0
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# Runs (or with --dry-run prints) one command, quoted so it can be pasted.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="${ZONE}")
  [[ -n "${PROJECT}" ]] && args+=(--project="${PROJECT}")
  run "${args[@]}"
}

# Runs a shell command on every worker (or on one: WORKER=0).
on_workers() {
  gcloud_tpu ssh "${TPU_NAME}" --worker="${WORKER:-all}" --command="$1"
}

workdir() {
  if [[ -n "${BUCKET}" && "${GCSFUSE}" == 1 ]]; then
    echo "${MOUNT}/runs/${RUN}"
  elif [[ -n "${BUCKET}" ]]; then
    echo "${BUCKET}/runs/${RUN}"
  else
    echo "\$HOME/runs/${RUN}"  # single-host slices only: the workdir must be shared
  fi
}

# --- Commands ---------------------------------------------------------------------------
# The run's memory plan for ACCELERATOR, compiled on this machine; dies when it does not fit.
plan_check() {
  if [[ "${SKIP_PLAN:-0}" == 1 ]]; then
    echo "tpu_vm.sh: SKIP_PLAN=1: not checking that the run fits ${ACCELERATOR}" >&2
    return
  fi
  local py="${REPO_ROOT}/.venv/bin/python"
  [[ -x "${py}" ]] || py=python3
  local plan=("${py}" -m im_jax.plan --config "${CONFIG}" --topology "${ACCELERATOR}" "$@")
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${plan[@]}"
    return
  fi
  if ! "${py}" -c "import libtpu" 2>/dev/null; then
    echo "tpu_vm.sh: warning: no libtpu here (it has wheels for Linux x86_64 only), so the" \
      "run's memory cannot be checked before creating ${ACCELERATOR}; going on" >&2
    return
  fi
  local out
  out="$(cd "${REPO_ROOT}" && "${plan[@]}")" || die "the plan failed (above); SKIP_PLAN=1 skips it"
  echo "${out}"
  grep -q '^verdict: fits' <<<"${out}" || die "the run does not fit ${ACCELERATOR} (above):" \
    "change the config (flags after --, e.g. --config.model.remat_policy=full), or SKIP_PLAN=1"
}

cmd_create() {
  plan_check "$@"
  local args=(create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}")
  [[ "${SPOT}" == 1 ]] && args+=(--spot)
  gcloud_tpu "${args[@]}"
}

cmd_setup() {
  local archive=/tmp/im_jax_src.tar.gz data=/tmp/im_jax_data.tar.gz
  # The committed tree (what a colleague could reproduce), and the paper's data files that
  # configs/paper.py reads from ../shared/data next to the repository.
  run git -C "${REPO_ROOT}" archive --format=tar.gz --prefix="${REMOTE_DIR}/" -o "${archive}" HEAD
  run tar -czf "${data}" -C "${REPO_ROOT}/.." shared/data
  gcloud_tpu scp "${archive}" "${data}" "${TPU_NAME}:/tmp/" --worker=all

  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "${REPO_ROOT}/requirements.txt")"
  local script
  script=$(cat <<EOF
set -euo pipefail
cd "\$HOME" && rm -rf "${REMOTE_DIR}" && tar -xzf /tmp/im_jax_src.tar.gz && tar -xzf /tmp/im_jax_data.tar.gz
cd "${REMOTE_DIR}"
${PYTHON} -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip
# The runtime part of requirements.txt (the test-only part pulls torch), then jax for TPUs.
sed '/^# Tests only/,\$d' requirements.txt > /tmp/requirements-runtime.txt
pip install -q -r /tmp/requirements-runtime.txt "jax[tpu]==${jax_version}"
python -c "import jax, flax, orbax.checkpoint, grain; print('jax', jax.__version__)"
EOF
)
  if [[ -n "${BUCKET}" && "${GCSFUSE}" == 1 ]]; then
    script+=$(cat <<EOF

# The shared workdir: every process writes its checkpoint shards into the same folder.
if ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p "${MOUNT}" && sudo chown "\$USER" "${MOUNT}"
mountpoint -q "${MOUNT}" || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "${BUCKET#gs://}" "${MOUNT}"
mkdir -p "${MOUNT}/runs"
EOF
)
  fi
  on_workers "${script}"
}

cmd_train() {
  local extra=""
  (($#)) && extra="$(printf ' %q' "$@")"
  local wd
  wd="$(workdir)"
  [[ -n "${BUCKET}" ]] || echo "tpu_vm.sh: no BUCKET: the workdir is each worker's own disk," \
    "which only a single-host slice (v4-8, v5litepod-8) can use" >&2
  # The model: read from the bucket (each worker keeps a local copy, made once).
  local model="\$HOME/models/${MODEL}" mkdir_wd=""
  [[ -n "${BUCKET}" ]] && model="${BUCKET}/models/${MODEL}"
  [[ "${wd}" == gs://* ]] || mkdir_wd="mkdir -p \"${wd}\" && "
  # Same command on every worker; jax.distributed finds the others through the TPU metadata
  # server. setsid + nohup: the trainers outlive this ssh session; the pid file is for `stop`.
  on_workers "cd \"\$HOME/${REMOTE_DIR}\" && . .venv/bin/activate && ${mkdir_wd}\
setsid nohup python -m im_jax.train --config ${CONFIG} --workdir \"${wd}\" \
--config.model.init_from=hf:${model}${extra} > \"\$HOME/train.log\" 2>&1 < /dev/null & \
echo \$! > \"\$HOME/train.pid\"; echo started on \$(hostname)"
}

cmd_logs() {
  WORKER=0 on_workers "tail -n +1 -F \"\$HOME/train.log\""
}

cmd_stop() {
  on_workers "test -f \"\$HOME/train.pid\" && kill -TERM \$(cat \"\$HOME/train.pid\") || true"
}

cmd_fetch() {
  run mkdir -p "${REPO_ROOT}/runs"
  if [[ -n "${BUCKET}" ]]; then
    run gcloud storage cp -r "${BUCKET}/runs/${RUN}" "${REPO_ROOT}/runs/"
  else
    gcloud_tpu scp --recurse "${TPU_NAME}:runs/${RUN}" "${REPO_ROOT}/runs/" --worker=0
  fi
}

cmd_delete() {
  gcloud_tpu delete "${TPU_NAME}" --quiet
}

cmd_ssh() {
  (($#)) || die "ssh needs a command after --"
  on_workers "$*"
}

main() {
  [[ "${1:-}" == "--dry-run" ]] && { DRY_RUN=1; shift; }
  local command="${1:-}"
  (($#)) && shift
  [[ "${1:-}" == "--" ]] && shift
  case "${command}" in
    setup|logs|stop|fetch|delete) "cmd_${command}" ;;
    create|train|ssh) "cmd_${command}" "$@" ;;
    *) awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "${BASH_SOURCE[0]}"
       die "unknown command '${command}'" ;;
  esac
}

main "$@"
