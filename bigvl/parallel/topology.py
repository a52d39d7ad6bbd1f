"""TPU slice names (`v5p-256`, `v4-32`, `v5e-64`, `v6e-16`) → compile-only devices, without a TPU.

libtpu describes any TPU topology to the compiler (`jax.experimental.topologies`), so the real train
step can be compiled ahead of time for a pod slice on a CPU machine, and its per-chip memory read
from the compiled program (launch/plan.py).

A slice name counts TensorCores, as Cloud TPU names do: v4 and v5p chips have two (one JAX device
per chip, "megacore"), v5e and v6e chips one. So v5p-256 is 128 chips (4x4x8) and v5e-64 is 64 chips
(8x8).
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str          # libtpu's name
  cores_per_chip: int      # TensorCores per chip: the slice name counts these
  ndim: int                # torus dimensions
  hbm_bytes: int           # per chip
  chip_config: str         # libtpu's chip_config_name


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 2, 3, 32 * GiB, "megacore"),
    "v5p": Chip("v5p", 2, 3, 95 * GiB, "megacore"),
    "v5e": Chip("v5e", 1, 2, 16 * GiB, "default"),
    "v6e": Chip("v6e", 1, 2, 32 * GiB, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                # as given, e.g. "v5p-256"
  chip: Chip
  shape: tuple[int, ...]   # chips along each torus dimension

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology_name(self) -> str:
    """libtpu's topology string, e.g. "v5p:4x4x8"."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    # Four chips per host (2x2), except single-host v5e/v6e slices of up to 8 chips.
    if self.chip.ndim == 2 and self.num_chips <= 8:
      return (*self.shape, 1)
    return (2, 2, 1) if self.num_chips >= 4 else (*self.shape, 1)[:3]


def torus_shape(num_chips: int, ndim: int) -> tuple[int, ...]:
  """The standard slice shape: double the smallest dimension (the last among equals) until the
  chips are placed: 3-D 4→2x2x1, 8→2x2x2, 16→2x2x4, 128→4x4x8; 2-D 4→2x2, 8→2x4, 64→8x8."""
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(f"{num_chips} chips: slice sizes are powers of two")
  shape = [1] * ndim
  if ndim == 3 and num_chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < num_chips:
    i = max(j for j in range(ndim) if shape[j] == min(shape))
    shape[i] *= 2
  if math.prod(shape) != num_chips:
    raise ValueError(f"{num_chips} chips do not form a {ndim}-D slice")
  return tuple(shape)


def parse(name: str) -> Slice:
  """"v5p-256" (TensorCores, the Cloud TPU name) or "v5p:4x4x8" (chips per dimension)."""
  m = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
  if not m:
    raise ValueError(f"topology {name!r}: use e.g. v5p-256, v4-32, v5e-64, v6e-16 or v5p:4x4x8")
  gen, sep, size = m.groups()
  gen = ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise ValueError(f"topology {name!r}: unknown TPU generation {gen!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[gen]
  if sep == ":":
    shape = tuple(int(s) for s in size.split("x"))
    if len(shape) != chip.ndim:
      raise ValueError(f"topology {name!r}: {gen} slices have {chip.ndim} dimensions")
  else:
    cores = int(size)
    if cores % chip.cores_per_chip:
      raise ValueError(f"topology {name!r}: {gen} names count {chip.cores_per_chip} cores per chip")
    shape = torus_shape(cores // chip.cores_per_chip, chip.ndim)
  return Slice(name, chip, shape)


def libtpu_available() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.get_tpu_library_path() is not None


def devices(slice_: Slice) -> list:
  """Compile-only devices of the slice (needs libtpu, not a TPU)."""
  import os
  from jax.experimental import topologies
  # Compiling for a topology touches no chip: another process holding libtpu's lockfile (a
  # training job on this VM, a test session) must not make it fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=slice_.topology_name,
      chip_config_name=slice_.chip.chip_config, chips_per_host_bounds=slice_.chips_per_host,
      num_slices=1)
  if len(topo.devices) != slice_.num_chips:
    raise RuntimeError(f"libtpu made {len(topo.devices)} devices for {slice_.topology_name}, "
                       f"expected {slice_.num_chips}")
  return list(topo.devices)
