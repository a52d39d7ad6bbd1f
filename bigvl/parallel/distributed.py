"""Joining the processes of a multi-host run into one JAX system (`jax.distributed`).

Every process of a run (one per TPU VM worker, one per GPU host or GPU) runs the same command. How
they find each other, in order of precedence:

1. explicit: `--coordinator_address`, `--num_processes`, `--process_id` (or the environment variables
   BIGVL_COORDINATOR_ADDRESS, BIGVL_NUM_PROCESSES, BIGVL_PROCESS_ID), for any cluster;
2. SLURM (`srun` with more than one task), Open MPI (`mpirun -n N`, N > 1) and multi-host Cloud TPU
   VMs: `jax.distributed.initialize()` reads everything from the environment (or the TPU metadata);
3. otherwise one process: nothing to initialise.

`plan` is the decision alone (no side effects, so it is unit-tested); `initialize` acts on it and must
run before anything touches a JAX backend.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

log = logging.getLogger("bigvl")

ENV_COORDINATOR = "BIGVL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "BIGVL_NUM_PROCESSES"
ENV_PROCESS_ID = "BIGVL_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run: `how` is "single", "explicit", "slurm", "mpi" or "tpu";
  `kwargs` is what `jax.distributed.initialize` gets (empty: auto-detection)."""
  how: str
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def distributed(self) -> bool:
    return self.how != "single"


def _int(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r}: not an integer") from None


def _hosts(value: str | None) -> int:
  return len([h for h in (value or "").split(",") if h.strip()])


def _on_tpu_vm() -> bool:
  # What jax itself checks: TPU chips on the PCI bus. Private API, so any failure means "no".
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001
    return False


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, env: Mapping[str, str] | None = None,
         on_tpu_vm: Callable[[], bool] = _on_tpu_vm) -> Plan:
  """Decides how this process joins the run; flags win over BIGVL_* variables, which win over
  cluster detection. Raises ValueError for an incomplete or inconsistent explicit setting."""
  env = os.environ if env is None else env
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES),
                                                               ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)

  if address is not None or count is not None or index is not None:
    if count == 1 and index in (None, 0):
      return Plan("single")
    missing = [name for name, v in (("coordinator_address", address), ("num_processes", count),
                                    ("process_id", index)) if v is None]
    if missing:
      raise ValueError(
          f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
          f"(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); missing: "
          f"{', '.join(missing)}")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"process_id={index} is not in [0, num_processes={count})")
    if ":" not in address:
      raise ValueError(f"coordinator_address={address!r}: use host:port (e.g. 10.0.0.2:1234)")
    return Plan("explicit", {"coordinator_address": address, "num_processes": count,
                             "process_id": index})

  if "SLURM_JOB_ID" in env and (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
    return Plan("slurm")
  if (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return Plan("mpi")
  # A TPU pod slice: several workers listed by the runtime, several slices (multislice), or, on a
  # TPU VM without those variables (GCE), jax asks the metadata server and counts the workers.
  if (_hosts(env.get("TPU_WORKER_HOSTNAMES")) > 1 or _hosts(env.get("TPU_PROCESS_ADDRESSES")) > 1
      or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
    return Plan("tpu")
  if "TPU_WORKER_HOSTNAMES" not in env and on_tpu_vm():
    return Plan("tpu")
  return Plan("single")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
  """Joins this process to the run as `plan` decides; call it before any JAX computation."""
  import jax
  p = plan(coordinator_address, num_processes, process_id)
  if not p.distributed:
    return p
  if p.how == "explicit" and jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # Collectives between CPU processes (tests, CPU clusters) need a transport.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  log.info("joining a multi-process run (%s) %s", p.how, p.kwargs or "")
  jax.distributed.initialize(**p.kwargs)
  log.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return p
