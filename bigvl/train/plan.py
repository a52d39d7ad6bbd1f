"""Plan a run on a TPU slice without one: compile the real train step ahead of time and read what it
needs per chip (launch/plan.py).

The step is `loop.build(config)`'s, the one `train` runs, compiled by libtpu for compile-only
devices of the slice; memory comes from the compiled program (`memory_analysis`), FLOPs from XLA's
cost analysis and from the model's shapes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from bigvl.parallel import mesh as mesh_lib
from bigvl.parallel import topology as topology_lib
from bigvl.train import config_lib, flops, loop


def _shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree with these shardings."""
  return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
             for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def _validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  # Data and weight paths belong to the machine that trains; everything else is checked here.
  config_lib.validate(config, num_devices=num_devices, num_processes=num_processes,
                      check_paths=False)


class DoesNotFit(RuntimeError):
  """The compiler found the step needs more memory per chip than the chip has."""


def plan(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  """Compiles `config`'s train step for the TPU slice `topology` (e.g. "v5p-256") and reports
  parameters, per-chip bytes, HBM use, FLOPs, compile time and the sharding of the largest arrays.
  Raises DoesNotFit when the compiler needs more than the chip's HBM."""
  slice_ = topology_lib.parse(topology)
  devices = topology_lib.devices(slice_)
  hosts = max(1, slice_.num_chips // math.prod(slice_.chips_per_host))
  _validate(config, len(devices), hosts)

  t0 = time.perf_counter()
  trainer = loop.build(config, devices=devices)
  state, frozen = trainer.shapes()
  t1 = time.perf_counter()
  lowered = trainer.step_fn.lower(state, frozen, trainer.batch_spec)
  t2 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):   # the TPU compiler refuses a program over the chip's HBM
      raise DoesNotFit(f"{slice_.name}, global batch {config.batch_size}: "
                       f"{str(e).splitlines()[0]}") from None
    raise
  t3 = time.perf_counter()

  mem = compiled.memory_analysis()
  shardings = trainer.state_shardings
  per_chip = {
      "params": _shard_bytes(trainer.abstract["params"], shardings["params"]),
      "frozen": _shard_bytes(trainer.frozen_abstract, trainer.frozen_shardings),
      "extra": _shard_bytes(trainer.abstract["extra"], shardings["extra"]),
      "opt_state": _shard_bytes(trainer.abstract["opt_state"], shardings["opt_state"]),
      "batch": _shard_bytes(trainer.batch_spec, jax.tree.map(lambda s: s.sharding,
                                                             trainer.batch_spec)),
      "arguments": mem.argument_size_in_bytes,
      "outputs": mem.output_size_in_bytes,
      "aliased": mem.alias_size_in_bytes,       # donated state, counted once
      "temporaries": mem.temp_size_in_bytes,
      "generated_code": mem.generated_code_size_in_bytes,
  }
  per_chip["total"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                       + mem.generated_code_size_in_bytes)
  per_example = trainer.system.flops_per_example()
  model_flops = None if per_example is None else config.batch_size * per_example
  compiled_flops = flops.compiled_flops(compiled)
  peak = flops.peak_flops(devices[0].device_kind) * slice_.num_chips

  all_params = loop.merge_params(trainer.abstract["params"], trainer.frozen_abstract)
  flat = jax.tree_util.tree_leaves_with_path(all_params)
  largest = sorted(zip(flat, jax.tree.leaves(loop.merge_params(shardings["params"],
                                                               trainer.frozen_shardings))),
                   key=lambda kv: -math.prod(kv[0][1].shape) * np.dtype(kv[0][1].dtype).itemsize)
  largest_arrays = [{
      "path": "params" + jax.tree_util.keystr(path), "shape": list(a.shape), "dtype": str(a.dtype),
      "spec": [None if e is None else e if isinstance(e, str) else list(e) for e in s.spec],
      "per_chip_shape": list(s.shard_shape(a.shape))} for (path, a), s in largest[:6]]

  return {
      "topology": slice_.name,
      "libtpu_topology": slice_.topology_name,
      "device_kind": devices[0].device_kind,
      "chips": slice_.num_chips,
      "hosts": hosts,
      "mesh": dict(trainer.mesh.shape),
      "global_batch": config.batch_size,
      "per_chip_batch": config.batch_size // trainer.dp,
      "system": config.system,
      "params": trainer.num_params,
      "trainable_params": trainer.num_trainable,
      "model": trainer.system.describe(),
      "per_chip_bytes": per_chip,
      "hbm_bytes": slice_.chip.hbm_bytes,
      "hbm_fraction": per_chip["total"] / slice_.chip.hbm_bytes,
      "fits": per_chip["total"] <= slice_.chip.hbm_bytes,
      "flops_per_step": {
          # Model FLOPs (bigvl.train.flops: 3 x forward matmuls, no rematerialisation) ...
          "model_analytic": None if model_flops is None else float(model_flops),
          # ... and XLA's count of one chip's program, times the chips. XLA counts a loop body once
          # (a scanned stack as one layer, the ring loss as one hop), so with scan_layers this is
          # far below what runs; launch/bench_train.py unrolls the loops to count them.
          "compiled_per_chip": compiled_flops,
          "compiled_total": compiled_flops * slice_.num_chips,
      },
      # The step time if every chip ran the model FLOPs at its peak bf16 rate (MFU = this / actual).
      "ideal_step_seconds": None if model_flops is None or not peak else model_flops / peak,
      "seconds": {"build": t1 - t0, "lower": t2 - t1, "compile": t3 - t2},
      "compile_seconds": t3 - t1,
      "largest_arrays": largest_arrays,
  }


def _num(x, fmt: str) -> str:
  return "unknown" if x is None else format(x, fmt)


def summary(report: dict[str, Any]) -> str:
  """The report as a few human-readable lines."""
  g = 1 << 30
  b = report["per_chip_bytes"]
  f = report["flops_per_step"]
  ideal = report["ideal_step_seconds"]
  lines = [
      f"{report['topology']} ({report['libtpu_topology']}, {report['chips']} chips, "
      f"{report['hosts']} hosts, {report['device_kind']}), mesh {report['mesh']}",
      f"model {report['model']}: {report['params']:,} parameters",
      f"global batch {report['global_batch']:,} ({report['per_chip_batch']} per chip)",
      f"per chip: params {b['params'] / g:.2f} GiB, optimizer state {b['opt_state'] / g:.2f} GiB, "
      f"batch {b['batch'] / g:.2f} GiB, temporaries {b['temporaries'] / g:.2f} GiB, "
      f"total {b['total'] / g:.2f} GiB of {report['hbm_bytes'] / g:.0f} GiB HBM "
      f"({100 * report['hbm_fraction']:.1f}%)" + ("" if report["fits"] else "  DOES NOT FIT"),
      f"FLOPs per step: model {_num(f['model_analytic'], '.3e')} (analytic), compiled "
      f"{f['compiled_total']:.3e} ({f['compiled_per_chip']:.3e} per chip; loop bodies counted "
      f"once); ideal step {_num(ideal and ideal * 1e3, '.0f')} ms at peak bf16",
      f"compile {report['compile_seconds']:.1f} s (build {report['seconds']['build']:.1f} s, "
      f"lower {report['seconds']['lower']:.1f} s, compile {report['seconds']['compile']:.1f} s)",
      "largest arrays:",
  ]
  for a in report["largest_arrays"]:
    lines.append(f"  {a['path']} {a['shape']} {a['dtype']} spec {a['spec']} → {a['per_chip_shape']}")
  return "\n".join(lines)
