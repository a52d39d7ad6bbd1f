"""Check every checkpoint of a run without changing anything: its arrays against the fingerprints
saved with them (a checksum per array, every float finite), every process's data position against
its digest, and the arrays' shapes against the run's config.

  python launch/verify_checkpoint.py --workdir=DIR
  python launch/verify_checkpoint.py --workdir=DIR --json=verify.json

Prints one line per step ("ok" or what is wrong) and the frozen weights' verdict when the run has
them; exits 1 when any is bad (0 when all are good). The config is the run's own (DIR/config.json).
"""

import json
import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_JSON = flags.DEFINE_string("json", "", "Also write {step: [problems]} to this JSON file.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  workdir = os.path.abspath(_WORKDIR.value)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    sys.exit(f"verify_checkpoint.py: {workdir} has no checkpoints/ (is it a training workdir?)")
  from bigvl.train import evaluate
  result = evaluate.verify_run(workdir)
  for step, problems in result.items():
    print(f"{step}: " + ("ok" if not problems else "; ".join(problems)), flush=True)
  if not result:
    print("no checkpoints")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
  return 1 if any(result.values()) else 0


if __name__ == "__main__":
  app.run(main)
