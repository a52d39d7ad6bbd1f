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


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with named axes in the given order; one size may be -1 (fill with the remaining devices)."""
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
  return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def named_shardings(logical_specs, mesh: Mesh, rules) -> object:
  """Pytree of logical PartitionSpecs → pytree of NamedSharding on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), rules)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def sharded_shapes(abstract, shardings):
  """Pytree of shapes (anything with .shape/.dtype) + matching NamedShardings → ShapeDtypeStructs,
  the target orbax restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def model_shapes(make_model, mesh: Mesh, rules):
  """Shapes first: (graphdef, abstract params as a pure dict, their NamedShardings), nothing
  allocated. `make_model(rngs)` builds the NNX module."""
  from flax import nnx
  abstract_model = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
  params = nnx.state(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
  return (nnx.graphdef(abstract_model), nnx.to_pure_dict(params),
          named_shardings(logical, mesh, rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
  spec = sharding.logical_to_spec(("batch",), rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)
