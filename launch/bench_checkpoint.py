"""What checkpoint verification costs: the time to fingerprint a train state against the time to
save it, at a real size, on this machine.

  python launch/bench_checkpoint.py --config=configs/m2_0p4b.py --json=bench_ckpt.json

Builds the config's train state (parameters and AdamW moments, on this machine's devices; no data),
then times, each `--repeats` times: the fingerprints alone (`bigvl.train.verify`), an orbax save
without them, a verified save (`Checkpointer.save`: fingerprints, finiteness, the record), and a
verified restore. Prints and writes the medians and the overhead of verification on a save.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of each part.")
_DIR = flags.DEFINE_string("dir", "", "Where to write the checkpoints (default: a temp dir).")
_JSON = flags.DEFINE_string("json", "", "Also write the result to this JSON file.")
flags.mark_flags_as_required(["config"])


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(config, repeats: int = 3, directory: str = "") -> dict:
  import jax
  import orbax.checkpoint as ocp
  from bigvl.train import checkpoint, loop, verify
  t = loop.build(config)
  state = jax.jit(t.init, out_shardings=(t.state_shardings, t.frozen_shardings))(
      jax.random.key(0))[0]
  jax.block_until_ready(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  root = directory or tempfile.mkdtemp(prefix="bench_ckpt_")
  out = {"params": t.num_params, "state_bytes": int(nbytes), "device": jax.devices()[0].device_kind,
         "num_devices": len(jax.devices())}
  verify.fingerprints(state)   # compile once
  out["fingerprint_s"] = _median_time(lambda: verify.fingerprints(state), repeats)
  step = [0]

  def plain():
    step[0] += 1
    ckptr = ocp.StandardCheckpointer()
    path = os.path.join(root, f"plain_{step[0]}")
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    ckptr.close()
    shutil.rmtree(path)
  out["save_unverified_s"] = _median_time(plain, repeats)
  ck = checkpoint.Checkpointer(os.path.join(root, "verified"), keep=1)

  def verified():
    step[0] += 1
    ck.save(step[0], state)
  out["save_verified_s"] = _median_time(verified, repeats)
  target, _ = t.shapes()
  out["restore_verified_s"] = _median_time(lambda: ck.restore(ck.latest_step(), target), repeats)
  ck.close()
  if not directory:
    shutil.rmtree(root)
  out["verification_overhead_on_save"] = out["save_verified_s"] / out["save_unverified_s"] - 1
  out["fingerprint_over_save"] = out["fingerprint_s"] / out["save_unverified_s"]
  return out


def main(argv):
  del argv
  result = run(_CONFIG.value, _REPEATS.value, _DIR.value)
  g = 1 << 30
  print(f"{result['params']:,} parameters, train state {result['state_bytes'] / g:.2f} GiB on "
        f"{result['num_devices']} × {result['device']}")
  print(f"  fingerprints            {result['fingerprint_s']:.2f} s")
  print(f"  save (orbax, unverified) {result['save_unverified_s']:.2f} s")
  print(f"  save (verified)          {result['save_verified_s']:.2f} s "
        f"({100 * result['verification_overhead_on_save']:+.1f}%)")
  print(f"  restore (verified)       {result['restore_verified_s']:.2f} s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  from bigvl.train import config_lib  # noqa: E402
  app.run(main, flags_parser=config_lib.flags_parser)
