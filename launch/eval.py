"""Evaluate a checkpoint with a config's evaluators.

  python launch/eval.py --config=configs/m2_tiny.py --workdir=DIR            # DIR's latest checkpoint
  python launch/eval.py --config=configs/m2_tiny.py --workdir=DIR --step=400
  python launch/eval.py --config=configs/m2_0p4b.py --workdir=DIR --checkpoint=IMPORTED_DIR \
      --config.evals.flickr30k_cn.source=jsonl:/data/f30k-cn_test.jsonl --only=flickr30k_cn

Each `config.evals` entry names its data (`source`: the embedded world, `tfds:NAME` with `data_dir`,
or `jsonl:FILE`; bigvl/evaluators/build.py); `--only` picks some of them. Prints a table and appends
one JSON line (metrics, step, checkpoint) to --json (default DIR/eval.jsonl). Many processes (a pod
slice, or --coordinator_address/--num_processes/--process_id as for launch/train.py) each read and
embed their own share of the data and print the same numbers.
"""

import errno
import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bigvl.train import config_lib  # noqa: E402

# --config.evals.NAME.KEY=... of an eval the config file lacks adds it (before the config flag,
# which reads its overrides from sys.argv when it is defined).
config_lib.take_new_evals(sys.argv)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose evals to run.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Which checkpoint of --workdir (default: the latest).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "Evaluate this instead: another run's workdir or a directory written by "
    "launch/import_torch.py.")
_JSON = flags.DEFINE_string("json", "", "JSON-lines output (default: WORKDIR/eval.jsonl).")
_ONLY = flags.DEFINE_list("only", [], "Run only these evals (names of config.evals entries).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 of a multi-process evaluation.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the evaluation.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  from bigvl.parallel import distributed
  logging.set_verbosity(logging.INFO)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)
  from bigvl import cli
  from bigvl.train import evaluate
  workdir = os.path.abspath(_WORKDIR.value)
  if "://" not in _WORKDIR.value and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(errno.ENOTDIR, "the workdir is a file (give a training run's "
                             "directory, or a new one for --checkpoint's results)", workdir)
  if not _CHECKPOINT.value and "://" not in _WORKDIR.value and not os.path.isdir(workdir):
    raise FileNotFoundError(errno.ENOENT, "no such workdir (give a training run's directory, or "
                            "--checkpoint=DIR to evaluate another one)", workdir)
  json_path = _JSON.value or os.path.join(workdir, "eval.jsonl")
  cli.check_writable(os.path.dirname(json_path) or ".", f"{json_path} goes there")
  out = evaluate.evaluate(_CONFIG.value, workdir, checkpoint=_CHECKPOINT.value,
                          step=_STEP.value, only=_ONLY.value)
  if jax.process_index() == 0:
    width = max(len(k) for k in out)
    for k, v in sorted(out.items()):
      print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    os.makedirs(workdir, exist_ok=True)
  evaluate.write_jsonl(json_path, out)


if __name__ == "__main__":
  from bigvl import cli  # noqa: E402
  from bigvl.train import config_lib  # noqa: E402
  cli.run_main(main, "eval.py", flags_parser=config_lib.flags_parser)
