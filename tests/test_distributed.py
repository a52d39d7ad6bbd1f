"""How a process decides to join a multi-host run (bigvl.parallel.distributed.plan)."""

import pytest

from bigvl.parallel import distributed

no_tpu = lambda: False  # noqa: E731


def _plan(*args, env=None, on_tpu_vm=no_tpu, **kwargs):
  return distributed.plan(*args, env=env or {}, on_tpu_vm=on_tpu_vm, **kwargs)


def test_plain_machine_is_one_process():
  assert _plan() == distributed.Plan("single")


def test_flags_give_an_explicit_run():
  p = _plan("10.0.0.2:1234", 4, 3)
  assert p == distributed.Plan("explicit", {"coordinator_address": "10.0.0.2:1234",
                                            "num_processes": 4, "process_id": 3})


def test_environment_variables_stand_in_for_flags_and_flags_win():
  env = {"BIGVL_COORDINATOR_ADDRESS": "h:1", "BIGVL_NUM_PROCESSES": "2", "BIGVL_PROCESS_ID": "1"}
  assert _plan(env=env).kwargs == {"coordinator_address": "h:1", "num_processes": 2,
                                   "process_id": 1}
  assert _plan(process_id=0, env=env).kwargs["process_id"] == 0


def test_explicit_settings_override_cluster_detection():
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}
  assert _plan("h:1", 2, 0, env=env).how == "explicit"


def test_one_process_by_flags_initialises_nothing():
  assert _plan(num_processes=1) == distributed.Plan("single")


@pytest.mark.parametrize("args, match", [
    (("h:1", None, 0), "num_processes"),
    ((None, 2, 0), "coordinator_address"),
    (("h:1", 2, None), "process_id"),
    (("h:1", 2, 2), r"not in \[0, num_processes=2\)"),
    (("h", 2, 1), "host:port"),
])
def test_incomplete_or_inconsistent_explicit_settings_are_errors(args, match):
  with pytest.raises(ValueError, match=match):
    _plan(*args)


def test_bad_environment_number_is_named():
  with pytest.raises(ValueError, match="BIGVL_NUM_PROCESSES"):
    _plan(env={"BIGVL_NUM_PROCESSES": "two"})


def test_slurm_with_several_tasks_auto_detects():
  assert _plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == distributed.Plan("slurm")
  # One task (an interactive allocation, `srun -n1`): a plain single process.
  assert _plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).how == "single"


def test_open_mpi_auto_detects():
  assert _plan(env={"OMPI_COMM_WORLD_SIZE": "8"}).how == "mpi"
  assert _plan(env={"OMPI_COMM_WORLD_SIZE": "1"}).how == "single"


def test_tpu_pod_auto_detects():
  assert _plan(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).how == "tpu"
  assert _plan(env={"MEGASCALE_COORDINATOR_ADDRESS": "w0:8080"}).how == "tpu"
  # A TPU VM whose runtime sets no variables (GCE): jax reads the workers from the metadata server.
  assert _plan(on_tpu_vm=lambda: True).how == "tpu"
  # One listed worker: a single-host slice.
  assert _plan(env={"TPU_WORKER_HOSTNAMES": "w0"}, on_tpu_vm=lambda: True).how == "single"
