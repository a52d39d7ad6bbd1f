"""Train a bigvl system.

  python launch/train.py --config=configs/m2_tiny.py --workdir=/tmp/bigvl_tiny
  python launch/train.py --config=configs/m2_tiny.py --workdir=DIR --config.total_steps=100

On a TPU pod slice (the same command on every worker), under SLURM (`srun`) or Open MPI the
processes find each other by themselves; elsewhere give each process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or $BIGVL_COORDINATOR_ADDRESS,
$BIGVL_NUM_PROCESSES, $BIGVL_PROCESS_ID).

Re-running the same command on the same workdir resumes from its latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint after the current step and exits 0. A config that cannot run, data that is
too broken and a run of non-finite steps each end it with a one-line error (exit 1).
"""

import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bigvl.train import config_lib  # noqa: E402

# --config.evals.NAME.KEY=... of an eval the config file lacks adds it (before the config flag,
# which reads its overrides from sys.argv when it is defined).
config_lib.take_new_evals(sys.argv)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run outside a TPU pod "
    "or SLURM (default $BIGVL_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run (default $BIGVL_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (default $BIGVL_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  from bigvl.parallel import distributed
  from bigvl.train import loop
  logging.set_verbosity(logging.INFO)
  # Before anything touches a JAX backend.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # Orbax and grain log every checkpoint internals at INFO; keep the console to bigvl's own lines.
  for name in ("absl",):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  result = loop.train(_CONFIG.value, os.path.abspath(_WORKDIR.value))
  # The evaluations' final figures (training and data counters are in metrics.jsonl).
  print({k: v for k, v in result.items()
         if "/" in k and k.split("/")[0] not in ("train", "data", "perf")})


if __name__ == "__main__":
  from bigvl.data import stream  # noqa: E402
  from bigvl import cli  # noqa: E402
  from bigvl.train import checkpoint, config_lib, nonfinite  # noqa: E402
  # Failures whose message says what to do end in one line (exit 1); --verbose shows the traceback.
  cli.run_main(main, "train.py", flags_parser=config_lib.flags_parser, expected=(
      stream.DataQualityError, nonfinite.NonfiniteError, checkpoint.CorruptCheckpointError,
      checkpoint.NoGoodCheckpointError, checkpoint.NonfiniteStateError))
