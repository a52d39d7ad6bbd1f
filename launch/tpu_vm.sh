#!/usr/bin/env bash
# Run bigvl on every worker of a Cloud TPU VM slice, from your workstation (gcloud logged in).
#
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=P] [--dir=bigvl] setup
#       copies this checkout (git-tracked files) to ~/DIR on every worker and installs it in
#       ~/DIR/.venv with the pinned versions and libtpu (pip install -c constraints.txt -e '.[tpu]')
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=P] [--dir=bigvl] run -- COMMAND...
#       runs COMMAND in ~/DIR with the venv active on all workers at once, e.g.
#       run -- python launch/train.py --config=configs/m2_10b.py --workdir=gs://BUCKET/m2_10b
#   launch/tpu_vm.sh ... stop
#       ends what `run` started, on all workers (a run left behind holds the TPU chips)
#
# Every worker runs the same command; launch/train.py finds the other workers itself
# (jax.distributed on a TPU VM needs no flags). Each worker's output goes to ~/DIR/run.log there and
# is streamed here; `run` returns when all workers have finished. Ctrl-C closes the SSH sessions,
# which ends the run; the same `run` command resumes it from its latest checkpoint. DRY_RUN=1
# prints the gcloud commands instead of running them.
set -euo pipefail

tpu="" zone="" project="" dir="bigvl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    setup|run|stop) break ;;
    *) echo "tpu_vm.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
action="${1:-}"; shift || true
if [[ -z "$tpu" || -z "$zone" || -z "$action" ]]; then
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=P] [--dir=bigvl] setup|run -- COMMAND...|stop" >&2
  exit 2
fi

where=("--zone=$zone" "--worker=all")
[[ -n "$project" ]] && where+=("--project=$project")

gc() {
  if [[ -n "${DRY_RUN:-}" ]]; then printf 'gcloud'; printf ' %q' "$@"; printf '\n'; else gcloud "$@"; fi
}

on_all() {  # on_all 'shell command' : runs it on every worker, in parallel
  gc compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$1"
}

case "$action" in
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="$(mktemp -d)/bigvl.tar.gz"
    git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
    gc compute tpus tpu-vm scp "$archive" "$tpu:~/bigvl.tar.gz" "${where[@]}"
    on_all "mkdir -p ~/$dir && tar -xzf ~/bigvl.tar.gz -C ~/$dir && cd ~/$dir && \
      (test -d .venv || python3.11 -m venv .venv) && . .venv/bin/activate && \
      pip install -q -c constraints.txt -e '.[tpu]' && python -c 'import jax; print(jax.devices())'"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { echo "tpu_vm.sh run: give the command after --" >&2; exit 2; }
    cmd="$(printf ' %q' "$@")"
    on_all "cd ~/$dir && . .venv/bin/activate && echo \$\$ > run.pid && \
     ${cmd} 2>&1 | tee run.log"
    ;;
  stop)
    on_all "cd ~/$dir && test -f run.pid && kill -- -\$(ps -o pgid= \$(cat run.pid) | tr -d ' ') \
      2>/dev/null; rm -f run.pid; true"
    ;;
  *) echo "tpu_vm.sh: unknown action $action (setup, run, stop)" >&2; exit 2 ;;
esac
