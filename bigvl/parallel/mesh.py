"""The device mesh and the default logical-axis rules."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigvl.parallel import sharding

# Logical name → mesh axes. Parameters are sharded over `fsdp` along "embed" (ZeRO-3 style) and over
# `tensor` along heads/mlp/vocab; the batch over every data-parallel axis.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("proj", "tensor"),
    ("length", None),
    ("position", None),
    ("norm", None),
)


def config_rules(config) -> tuple:
  """The logical-axis rules of a config: its `sharding_rules`, else DEFAULT_RULES."""
  return tuple(config.sharding_rules or DEFAULT_RULES)


def _slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_array(sizes: Sequence[int], devices: Sequence[jax.Device],
                 names: Sequence[str] = ()) -> np.ndarray:
  """`devices` laid out in a mesh of `sizes`, in the order their interconnect wants.

  On TPUs (and GPUs) `mesh_utils.create_device_mesh` maps the mesh's axes onto the physical torus,
  so that the collectives of the inner axes (fsdp all-gathers, tensor reductions) run between
  neighbouring chips; over several slices `create_hybrid_device_mesh` puts the slices on the outer
  data axis (data-parallel gradients are the only traffic over the data-centre network). On the
  CPU, or where the shape does not map onto the torus, the devices keep their order.
  """
  from jax.experimental import mesh_utils
  devices = list(devices)
  if devices[0].platform == "cpu":
    return np.asarray(devices).reshape(sizes)
  slices = _slices(devices)
  try:
    if slices > 1:
      outer = next((i for i, n in enumerate(names) if n == "data" and sizes[i] % slices == 0),
                   next((i for i, s in enumerate(sizes) if s % slices == 0), None))
      if outer is None:
        raise ValueError(f"no mesh axis of {dict(zip(names, sizes))} divides into {slices} slices")
      ici = [s // slices if i == outer else s for i, s in enumerate(sizes)]
      dcn = [slices if i == outer else 1 for i in range(len(sizes))]
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    import logging
    logging.getLogger("bigvl").warning(
        "mesh %s does not map onto the devices' interconnect (%s): devices in their listed "
        "order", dict(zip(names, sizes)), e)
    return np.asarray(devices).reshape(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with named axes in the given order; one size may be -1 (fill with the remaining devices).
  The devices are placed by `device_array` (along the torus on TPUs)."""
  devices = list(jax.devices() if devices is None else devices)
  names = list(axes)
  sizes = [int(axes[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh {dict(axes)} does not divide the {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                     f"there are {len(devices)}")
  return Mesh(device_array(sizes, devices, names), tuple(names))


def named_shardings(logical_specs, mesh: Mesh, rules) -> object:
  """Pytree of logical PartitionSpecs → pytree of NamedSharding on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), rules)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def sharded_shapes(abstract, shardings):
  """Pytree of shapes (anything with .shape/.dtype) + matching NamedShardings → ShapeDtypeStructs,
  the target orbax restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def split_shapes(make_model, mesh: Mesh, rules, filters: Sequence):
  """Shapes first: (graphdef, [abstract pure dict per filter], [their NamedShardings]), nothing
  allocated. `make_model(rngs)` builds the NNX module; every variable must fall under one of
  `filters` (e.g. trained and frozen parameters), or this says which do not."""
  from flax import nnx
  from bigvl.models.layers import init as layer_init

  abstract_model = layer_init.abstract(make_model)
  graphdef, *states, rest = nnx.split(abstract_model, *filters, ...)
  left = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(rest))]
  if left:
    raise ValueError(f"the model holds state that is not a parameter ({len(left)} leaves, e.g. "
                     f"{left[:3]}): give randomness through the step's rng, not stored RNG state")
  abstracts = [nnx.to_pure_dict(st) for st in states]
  shardings = [named_shardings(nnx.to_pure_dict(nnx.get_partition_spec(st)), mesh, rules)
               for st in states]
  return graphdef, abstracts, shardings


def model_shapes(make_model, mesh: Mesh, rules):
  """(graphdef, abstract parameters as a pure dict, their NamedShardings): every nnx.Param."""
  from flax import nnx
  graphdef, (params,), (shardings,) = split_shapes(make_model, mesh, rules, (nnx.Param,))
  return graphdef, params, shardings


def batch_axes(rules, axis_names: Sequence[str] | None = None) -> tuple[str, ...]:
  """The mesh axes that shard the batch under `rules`, in order (the one place this is computed).

  With `axis_names`, only those of them that the mesh has (a mesh without them, e.g. one ad-hoc
  axis in a benchmark, is then pure data parallelism over nothing).
  """
  spec = sharding.logical_to_spec(("batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return axes if axis_names is None else tuple(a for a in axes if a in axis_names)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))


def data_parallel_size(mesh: Mesh | Mapping[str, int], rules) -> int:
  """Batch shards: the product of the batch axes' sizes (of a Mesh, or of a dict of axis sizes)."""
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  return math.prod(sizes.get(a, 1) for a in batch_axes(rules))


def process_batch_block(batch_sharding: NamedSharding, global_batch: int) -> tuple[int, int, int]:
  """(rows, block, blocks): this process's devices hold rows [block*rows, (block+1)*rows) of the
  global batch, which splits into `blocks` such blocks. What this process's input pipeline reads.

  Processes whose devices hold the same rows (the batch replicated across them) get the same block.
  """
  indices = batch_sharding.addressable_devices_indices_map((global_batch,)).values()
  covered = sorted({r for idx in indices for r in range(*idx[0].indices(global_batch))})
  lo, hi = covered[0], covered[-1] + 1
  rows = hi - lo
  if len(covered) != rows or lo % rows or global_batch % rows:
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {covered[:4]}... of {global_batch}: not one "
        "contiguous, aligned block; order the mesh devices so that each process's devices are "
        "neighbours along the batch axes")
  return rows, lo // rows, global_batch // rows
