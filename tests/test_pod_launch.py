"""The pod launch scripts: the TPU VM one runs one command on every worker; the SLURM one parses."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")


def _dry(*args):
  p = subprocess.run(["bash", TPU_VM, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                     env={**os.environ, "DRY_RUN": "1"})
  return p.returncode, p.stdout, p.stderr


def test_run_starts_the_same_command_on_all_workers():
  rc, out, err = _dry("--tpu=pod", "--zone=us-east5-a", "--project=proj", "run", "--",
                      "python", "launch/train.py", "--config=configs/m2_10b.py",
                      "--config.data.train_files=gs://b/train-*.array_record")
  assert rc == 0, err
  (line,) = out.splitlines()
  assert line.startswith("gcloud compute tpus tpu-vm ssh pod ")
  for part in ("--zone=us-east5-a", "--worker=all", "--project=proj", "launch/train.py",
               "configs/m2_10b.py", "run.log", ".venv/bin/activate"):
    assert part in line, part


def test_setup_copies_and_installs_with_libtpu_on_all_workers():
  if shutil.which("git") is None:
    pytest.skip("needs git")
  rc, out, err = _dry("--tpu=pod", "--zone=z", "setup")
  assert rc == 0, err
  scp, ssh = out.splitlines()
  assert "tpu-vm scp" in scp and "--worker=all" in scp
  assert "--worker=all" in ssh and "constraints.txt" in ssh and "tpu" in ssh


def test_usage_errors():
  assert _dry("--zone=z", "run", "--", "true")[0] == 2       # no --tpu
  assert _dry("--tpu=p", "--zone=z", "run")[0] == 2          # no command
  assert _dry("--tpu=p", "--zone=z", "--bogus", "stop")[0] == 2


def test_slurm_script_parses_and_runs_train_under_srun():
  path = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
  assert subprocess.run(["bash", "-n", path]).returncode == 0
  text = open(path).read()
  assert "#SBATCH --ntasks-per-node=8" in text and "srun" in text and "launch/train.py" in text
