"""Evaluate a checkpoint with a config's evaluators.

  python launch/eval.py --config=configs/m2_tiny.py --workdir=DIR            # DIR's latest checkpoint
  python launch/eval.py --config=configs/m2_tiny.py --workdir=DIR --step=400
  python launch/eval.py --config=configs/m2_0p4b.py --workdir=DIR --checkpoint=IMPORTED_DIR

Prints a table and appends one JSON line (metrics, step, checkpoint) to --json (default DIR/eval.jsonl).
"""

import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose evals to run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Which checkpoint of --workdir (default: the latest).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "Evaluate this instead: another run's workdir or a directory written by "
    "launch/import_torch.py.")
_JSON = flags.DEFINE_string("json", "", "JSON-lines output (default: WORKDIR/eval.jsonl).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from bigvl.train import evaluate
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  workdir = os.path.abspath(_WORKDIR.value)
  out = evaluate.evaluate(_CONFIG.value, workdir, checkpoint=_CHECKPOINT.value, step=_STEP.value)
  width = max(len(k) for k in out)
  for k, v in sorted(out.items()):
    print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  os.makedirs(workdir, exist_ok=True)
  evaluate.write_jsonl(_JSON.value or os.path.join(workdir, "eval.jsonl"), out)


if __name__ == "__main__":
  app.run(main)
