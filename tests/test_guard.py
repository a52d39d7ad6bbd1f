"""The under-sharding guard: a rules table that leaves large parameters replicated along fsdp fails
when the train step is built, before anything compiles."""

import jax
import pytest

from bigvl.parallel import guard, mesh as mesh_lib
from conftest import small_config

# A rules table that forgets to shard "embed", the only axis the default maps to fsdp.
NO_FSDP = tuple((name, None if name == "embed" else axes) for name, axes in mesh_lib.DEFAULT_RULES)


def _config(**overrides):
  # No world is needed: build() takes the variant's vocabulary (1024 rows of width 32: 128 KiB).
  c = small_config("", **{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1,
                          "sharding_guard_min_bytes": 64 << 10, **overrides})
  return c


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def test_guard_fires_when_embed_is_not_sharded():
  from bigvl.train import loop
  with pytest.raises(guard.UnderShardedError, match=r"replicated along mesh axis 'fsdp'") as e:
    loop.build(_config(sharding_rules=NO_FSDP))
  assert "text_embed" in str(e.value) and "sharding_rules" in str(e.value)


def test_default_rules_pass_and_shard_the_large_parameters():
  from bigvl.train import loop
  t = loop.build(_config())
  assert not guard.replicated_along(t.abstract["params"], t.state_shardings["params"], "fsdp",
                                    64 << 10)
  assert "fsdp" in t.state_shardings["params"]["backbone"]["text_embed"]["embedding"].spec


def test_guard_is_off_without_fsdp_or_with_threshold_zero():
  from bigvl.train import loop
  loop.build(_config(sharding_rules=NO_FSDP, sharding_guard_min_bytes=0))
  loop.build(_config(sharding_rules=NO_FSDP, **{"mesh.data": 8, "mesh.fsdp": 1}))
  # Small parameters may stay replicated: the threshold is what counts.
  loop.build(_config(sharding_rules=NO_FSDP, sharding_guard_min_bytes=1 << 20))
