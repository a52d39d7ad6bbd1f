"""Time the real training step of a config: step time, samples/s, FLOPs, MFU, peak memory.

  python launch/bench_train.py --config=configs/m2_tiny.py --json=/tmp/bench_tiny.json
  # one H100, mixed precision and cuDNN attention:
  python launch/bench_train.py --config=configs/m2_0p4b.py --config.batch_size=256 \
      --config.model.dtype=bfloat16 --config.model.attention=cudnn --measure_peak
  # FLOPs and memory of the 0.4B step without running it (any machine):
  python launch/bench_train.py --config=configs/m2_0p4b.py --config.batch_size=8 --compile_only

The step is `bigvl.train.loop.build(config).step_fn`, the one `launch/train.py` runs (sharded over
`config.mesh`, state donated), fed a synthetic batch already on the devices: the input pipeline is
measured apart, by launch/bench_data.py. After `--warmup` steps, `--steps` steps are timed one by one
(each waits for the new state); the median is reported.

FLOPs per sample are given twice: the analytic model count (the system's `flops_per_example()`;
for M²-Encoder both towers' matrix products, attention and the contrastive similarity, × 3 for the
backward; the convention is bigvl.train.flops's) and the compiled
program's `cost_analysis()` (everything XLA emits: also LayerNorm, GELU, softmax, the optimizer and
any recomputation). Cost analysis counts a while-loop body once, so when the step has loops (layers
scanned, GradCache micro-batches) it is counted on the same step with those loops unrolled.

MFU = analytic FLOPs × samples/s ÷ peak, the peak from `bigvl.train.flops.PEAK_FLOPS` (dense bf16,
per chip × chips) or, with `--measure_peak` and always on CPU, from a large matmul in the model's
compute dtype timed here. Peak memory is the devices' `peak_bytes_in_use` where they report it
(GPU, TPU), else the compiled program's arguments + outputs − donated + temporaries.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one loads the program).")
_JSON = flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
_MEASURE_PEAK = flags.DEFINE_bool("measure_peak", False,
                                  "Time a large matmul for the device's peak (always done on CPU).")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile and report FLOPs and memory; run nothing.")
flags.mark_flags_as_required(["config"])

# Config keys that make the step loop; each is set to its unrolled value to count FLOPs.
UNROLLED = {"loss.accum_steps": 1, "model.scan_layers": False}


def _set(config, dotted: str, value) -> bool:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      return False
    node = node[p]
  if leaf not in node or node[leaf] == value:
    return False
  node[leaf] = value
  return True


def _compile(config):
  from bigvl.train import loop
  trainer = loop.build(config)
  state, frozen = trainer.shapes()
  t0 = time.perf_counter()
  compiled = trainer.step_fn.lower(state, frozen, trainer.batch_spec).compile()
  return trainer, compiled, time.perf_counter() - t0


def count_flops(config, trainer, compiled) -> dict:
  """Analytic and compiled FLOPs per sample (the compiled ones with the step's loops unrolled)."""
  import jax
  from bigvl.train import flops
  analytic = trainer.system.flops_per_example()
  n = trainer.mesh.devices.size
  raw = flops.compiled_flops(compiled) * n / config.batch_size
  loops = flops.loop_trip_counts(compiled.as_text())
  out = {"flops_per_sample_analytic": analytic, "flops_per_sample_compiled_raw": raw,
         "loops_in_step": loops}
  counted, counted_loops, changed = raw, loops, []
  if loops:
    unrolled = config.copy_and_resolve_references()
    with unrolled.unlocked():
      changed = [k for k, v in UNROLLED.items() if _set(unrolled, k, v)]
    if changed:
      t2, c2, _ = _compile(unrolled)
      counted = flops.compiled_flops(c2) * n / config.batch_size
      counted_loops = flops.loop_trip_counts(c2.as_text())
      del t2, c2
  out.update({
      "flops_per_sample_compiled": counted,
      "flops_counted_with": {k: UNROLLED[k] for k in changed},
      # Loops still there: their bodies are counted once, the compiled figure is a lower bound.
      "loops_left_in_count": counted_loops,
      "flops_compiled_over_analytic": counted / analytic if analytic else None,
      "flops_forward_by_part": dict(trainer.system.forward_flops_by_part()),
  })
  jax.clear_caches()
  return out


def measure_peak(dtype, device) -> float:
  """FLOP/s of a chain of n×n matmuls on one device (n = 8192 on accelerators, 1024 on CPU)."""
  import jax
  import jax.numpy as jnp
  cpu = device.platform == "cpu"
  n, k = (1024, 4) if cpu else (8192, 20)
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
  b = jax.device_put((jax.random.normal(key_b, (n, n)) / n ** 0.5).astype(dtype), device)
  chain = jax.jit(lambda a, b: jax.lax.fori_loop(0, k, lambda _, c: c @ b, a))
  chain(a, b).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    chain(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 * k / min(times)


def synthetic_batch(trainer, seed: int = 0) -> dict:
  """The system's fake batch of the step's shapes (no data needed), already on the devices."""
  import jax
  fake = trainer.system.fake_batch(trainer.batch_spec[next(iter(trainer.batch_spec))].shape[0],
                                   seed)
  return {k: jax.device_put(fake[k], spec.sharding) for k, spec in trainer.batch_spec.items()}


def peak_memory(compiled, devices) -> tuple[int, str, dict]:
  mem = compiled.memory_analysis()
  est = {}
  if mem is not None:
    est = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "alias_size_in_bytes", "temp_size_in_bytes")}
  stats = [d.memory_stats() for d in devices]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "device memory_stats peak_bytes_in_use", est
  if est:
    peak = (est["argument_size_in_bytes"] + est["output_size_in_bytes"]
            - est["alias_size_in_bytes"] + est["temp_size_in_bytes"])
    return peak, "compiled memory_analysis (arguments + outputs - donated + temporaries)", est
  return 0, "unavailable", est


def run(config, *, steps: int = 10, warmup: int = 3, measure: bool = False,
        compile_only: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  from bigvl.train import flops
  trainer, compiled, compile_s = _compile(config)
  devices = list(trainer.mesh.devices.flat)
  dev = devices[0]
  result = {
      "config": {"system": config.system, "batch_size": config.batch_size,
                 "mesh": dict(trainer.mesh.shape), **trainer.system.describe()},
      "device": dev.device_kind, "platform": dev.platform, "num_devices": len(devices),
      "jax": jax.__version__, "num_params": trainer.num_params, "compile_s": compile_s,
  }
  result.update(count_flops(config, trainer, compiled))

  dtype = jnp.dtype(trainer.system.describe().get("dtype", "float32"))
  table = flops.peak_flops(dev.device_kind)
  measured = (measure_peak(dtype, dev)
              if measure or (dev.platform == "cpu" and not compile_only) else None)
  # A CPU is one chip however many devices XLA splits it into.
  chips = 1 if dev.platform == "cpu" else len(devices)
  result.update({"peak_flops_per_chip_table": table, "peak_flops_per_chip_measured": measured,
                 "chips": chips})

  if not compile_only:
    state, frozen = jax.jit(trainer.init, out_shardings=(
        trainer.state_shardings, trainer.frozen_shardings))(jax.random.key(config.seed))
    batch = synthetic_batch(trainer)
    for _ in range(warmup):
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    samples = config.batch_size / step
    achieved = (result["flops_per_sample_analytic"] or 0) * samples or None
    peak = table if table is not None else measured
    result.update({
        "step_time_s": step, "step_times_s": times, "samples_per_s": samples,
        "model_flops_per_s": achieved,
        "mfu": achieved / (peak * chips) if peak and achieved else None,
        "mfu_vs_measured_peak": achieved / (measured * chips) if measured and achieved else None,
        "loss": float(metrics["train/loss"]),
    })
  else:
    result.update({"step_time_s": None, "samples_per_s": None, "mfu": None})
  peak, source, est = peak_memory(compiled, devices)
  result.update({"peak_bytes": peak, "peak_bytes_source": source, "compiled_memory": est})
  return result


def _fmt(x, unit=""):
  if x is None:
    return "-"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def report(r: dict) -> str:
  c = r["config"]
  model = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("system", "batch_size", "mesh"))
  ratio = r["flops_compiled_over_analytic"]
  lines = [
      f"{c['system']} batch {c['batch_size']} ({model}) on {r['num_devices']} × {r['device']} "
      f"({r['platform']}, mesh {c['mesh']}); {r['num_params']:,} parameters; compiled in "
      f"{r['compile_s']:.1f} s",
      f"  step time (median)       {_fmt(r['step_time_s'], 's')}",
      f"  samples/s                {_fmt(r['samples_per_s'])}",
      f"  FLOPs/sample analytic    {_fmt(r['flops_per_sample_analytic'])}",
      f"  FLOPs/sample compiled    {_fmt(r['flops_per_sample_compiled'])} "
      f"({'-' if ratio is None else format(ratio, '.3f')} × analytic"
      + (f"; counted with {r['flops_counted_with']}" if r["flops_counted_with"] else "") + ")",
      f"  peak FLOP/s per chip     table {_fmt(r['peak_flops_per_chip_table'])}, measured "
      f"{_fmt(r['peak_flops_per_chip_measured'])}",
      f"  MFU                      {'-' if r['mfu'] is None else format(r['mfu'], '.1%')}",
      f"  peak memory              {_fmt(r['peak_bytes'], 'B')} ({r['peak_bytes_source']})",
  ]
  return "\n".join(lines)


def main(argv):
  del argv
  from bigvl.train import config_lib
  try:
    config_lib.validate(_CONFIG.value, check_paths=False)  # a synthetic batch: no data needed
    result = run(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                 measure=_MEASURE_PEAK.value, compile_only=_COMPILE_ONLY.value)
  except config_lib.ConfigError as e:
    sys.exit(f"bench_train.py: ConfigError: {e}")
  print(report(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  from bigvl.train import config_lib  # noqa: E402
  app.run(main, flags_parser=config_lib.flags_parser)
