"""What checkpoint verification costs: the time to save a train state with and without the digests
restore verifies, at a real size, on this machine.

  python launch/bench_checkpoint.py --config=configs/m2_0p4b.py --json=bench_ckpt.json

Builds the config's train state (parameters and AdamW moments, on this machine's devices; no data),
then times, each `--repeats` times, alternating: the loop's save (`Checkpointer.save` with the state
known finite, as the train step guarantees) without its file digests, and with them; then the
digests of one saved step alone, a save that also checks finiteness (what a caller outside the
loop gets), a verified restore, and, for comparison, the per-array fingerprints of format 1.
Prints and writes the medians and the overhead of verification on a save.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of each part.")
_DIR = flags.DEFINE_string("dir", "", "Where to write the checkpoints (default: a temp dir).")
_JSON = flags.DEFINE_string("json", "", "Also write the result to this JSON file.")
_TRAINED = flags.DEFINE_bool(
    "trained_like", True, "Fill the state with random values (a trained state's bytes do not "
    "compress; a fresh one's zero Adam moments do, which would flatter the save).")
flags.mark_flags_as_required(["config"])


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(config, repeats: int = 3, directory: str = "", trained_like: bool = True) -> dict:
  import jax
  from bigvl.train import checkpoint, loop, verify
  t = loop.build(config)
  state = jax.jit(t.init, out_shardings=(t.state_shardings, t.frozen_shardings))(
      jax.random.key(0))[0]
  if trained_like:
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    state = jax.tree.map(
        lambda x: (jax.random.normal(next(keys), x.shape, x.dtype) * 0.02
                   if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x), state)
  jax.block_until_ready(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  root = directory or tempfile.mkdtemp(prefix="bench_ckpt_")
  out = {"params": t.num_params, "trained_like": trained_like, "state_bytes": int(nbytes), "device": jax.devices()[0].device_kind,
         "num_devices": len(jax.devices()), "repeats": repeats}
  ck = checkpoint.Checkpointer(os.path.join(root, "ck"), keep=1)
  with_digests = ck._write_digests
  step = [0]
  plain, verified = [], []

  def save(digests: bool) -> float:
    step[0] += 1
    ck._write_digests = with_digests if digests else (lambda s: None)
    t0 = time.perf_counter()
    ck.save(step[0], state, known_finite=True)
    return time.perf_counter() - t0
  save(True)   # compile and warm the filesystem
  for _ in range(repeats):   # alternating, so that drift of the machine hits both alike
    plain.append(save(False))
    verified.append(save(True))
  ck._write_digests = with_digests
  out["save_unverified_each_s"], out["save_verified_each_s"] = plain, verified
  out["save_unverified_s"] = statistics.median(plain)
  out["save_verified_s"] = statistics.median(verified)
  out["digests_s"] = _median_time(lambda: ck._write_digests(step[0]), repeats)
  out["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                                os.walk(os.path.join(root, "ck", str(step[0]))) for f in fs)

  def save_checked():
    step[0] += 1
    ck.save(step[0], state)
  out["save_checking_finite_s"] = _median_time(save_checked, repeats)
  target, _ = t.shapes()
  out["restore_verified_s"] = _median_time(lambda: ck.restore(ck.latest_step(), target), repeats)
  ck.close()
  verify.fingerprints(state)   # compile once
  out["fingerprints_format1_s"] = _median_time(lambda: verify.fingerprints(state), repeats)
  if not directory:
    shutil.rmtree(root)
  out["verification_overhead_on_save"] = out["save_verified_s"] / out["save_unverified_s"] - 1
  out["digests_over_save"] = out["digests_s"] / out["save_unverified_s"]
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  result = run(_CONFIG.value, _REPEATS.value, _DIR.value, _TRAINED.value)
  g = 1 << 30
  print(f"{result['params']:,} parameters, train state {result['state_bytes'] / g:.2f} GiB on "
        f"{result['num_devices']} × {result['device']}")
  print(f"  save without digests       {result['save_unverified_s']:.2f} s  "
        f"({result['checkpoint_bytes'] / 2**20:,.0f} MiB written)")
  print(f"  save with digests (loop)   {result['save_verified_s']:.2f} s "
        f"({100 * result['verification_overhead_on_save']:+.1f}%)")
  print(f"  digests alone              {result['digests_s']:.2f} s "
        f"({100 * result['digests_over_save']:.1f}% of a save)")
  print(f"  save checking finiteness   {result['save_checking_finite_s']:.2f} s")
  print(f"  restore (verified)         {result['restore_verified_s']:.2f} s")
  print(f"  format-1 fingerprints      {result['fingerprints_format1_s']:.2f} s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  from bigvl.train import config_lib  # noqa: E402
  app.run(main, flags_parser=config_lib.flags_parser)
