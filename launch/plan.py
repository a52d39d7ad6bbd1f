"""Compile a config's train step ahead of time for a TPU slice, on any machine with libtpu installed
(pip install -e '.[tpu]'; no TPU needed), and report what it needs per chip.

  python launch/plan.py --config=configs/m2_10b.py --topology=v5p-256
  python launch/plan.py --config=configs/m2_1b.py --topology=v5p-128 --json=plan_1b.json
  python launch/plan.py --config=configs/m2_10b.py --topology=v5p-256 --config.batch_size=65536

Topologies: v4-N, v5p-N (N TensorCores, two per chip), v5e-N (or v5litepod-N) and v6e-N (N chips),
or libtpu's own form, e.g. v5p:4x4x8. Prints parameters, per-chip bytes of parameters, optimizer
state and temporaries (from the compiled program) against the chip's HBM, FLOPs per step, compile
time and the sharding of the largest arrays; --json writes them (keys include params,
per_chip_bytes, hbm_bytes, global_batch). Exits 1 when the step does not fit the chip's HBM
(the compiler's own figure is printed).
"""

import json
import logging as std_logging
import os
import sys

# Compile for the slice, run nothing: never take this machine's accelerator (on a TPU VM, a
# training run may hold it).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling needs no exclusive hold on libtpu: plan beside a run, a test suite or another plan.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-256, v4-32, v5e-64, v6e-16.")
_JSON = flags.DEFINE_string("json", "", "Also write the report to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  from bigvl.parallel import topology
  from bigvl.train import plan
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  if not topology.libtpu_available():
    sys.exit("plan.py needs libtpu to compile for TPUs: pip install -c constraints.txt -e '.[tpu]'")
  from bigvl.train import config_lib
  try:
    report = plan.plan(_CONFIG.value, _TOPOLOGY.value)
  except plan.DoesNotFit as e:
    sys.exit(f"plan.py: does not fit: {e}")
  except config_lib.ConfigError as e:
    sys.exit(f"plan.py: ConfigError: {e}")
  print(plan.summary(report), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)
  if not report["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  from bigvl.train import config_lib  # noqa: E402
  app.run(main, flags_parser=config_lib.flags_parser)
