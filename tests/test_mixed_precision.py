"""Mixed precision from the config: bfloat16 compute trains like float32, parameters stay float32."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.train import loop
from conftest import small_config


def _batch(trainer, seed=0):
  rng = np.random.default_rng(seed)
  spec = trainer.batch_spec
  b, s = spec["image"].shape[0], spec["image"].shape[1]
  n = spec["text"].shape[1]
  lengths = rng.integers(2, n + 1, b)
  host = {"image": rng.integers(0, 256, (b, s, s, 3)).astype(np.uint8),
          "text": rng.integers(1, 300, (b, n)).astype(np.int32),
          "text_mask": (np.arange(n)[None] < lengths[:, None]).astype(np.int32)}
  return {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}


def _train(dtype: str, steps: int = 8):
  c = small_config("", **{"model.dtype": dtype, "optim.lr": 3e-3})
  t = loop.build(c)
  state, frozen = jax.jit(t.init, out_shardings=(t.state_shardings, t.frozen_shardings))(
      jax.random.key(0))
  batch = _batch(t)
  losses = []
  for _ in range(steps):
    state, m = t.step_fn(state, frozen, batch)
    losses.append(float(m["train/loss"]))
  # The program as traced (the CPU backend may widen bf16 products when it compiles).
  return state, np.array(losses), t.step_fn.lower(state, frozen, batch).as_text()


@pytest.fixture(scope="module")
def runs():
  return {d: _train(d) for d in ("float32", "bfloat16")}


def test_bfloat16_trains_close_to_float32(runs):
  (_, f32, _), (_, bf16, _) = runs["float32"], runs["bfloat16"]
  assert f32[-1] < f32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1, (f32, bf16)
  np.testing.assert_allclose(bf16, f32, rtol=0.03)


def test_parameters_and_optimizer_state_stay_float32(runs):
  state, _, _ = runs["bfloat16"]
  for leaf in jax.tree.leaves(state["params"]):
    assert leaf.dtype == jnp.float32
  floats = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_bfloat16_step_multiplies_in_bfloat16(runs):
  def products(text):
    """(operand dtype, operand rank) of every matrix product of the traced step."""
    found = re.findall(r"stablehlo\.(?:dot_general|convolution).*: \(tensor<((?:\d+x)*)(\w+)>", text)
    return [(dtype, dims.count("x")) for dims, dtype in found]
  assert {dtype for dtype, _ in products(runs["float32"][2])} == {"f32"}
  bf16 = products(runs["bfloat16"][2])
  # Every product of the layers (batch × length × ... operands), forward and backward, attention
  # included, is bf16; only the small float32 heads and the loss (2-D operands) stay float32.
  assert [p for p in bf16 if p[0] == "f32" and p[1] > 2] == []
  assert sum(p[0] == "bf16" for p in bf16) > 50


def test_evaluation_computes_in_float32_when_training_computes_in_bfloat16():
  """model.eval_dtype (default float32): the predictors of a bfloat16 run give the float32
  model's embeddings, not the bfloat16 ones (which differ by about 1e-3)."""
  from flax import nnx
  from bigvl.evaluators import common
  from bigvl.parallel import mesh as mesh_lib
  from bigvl.train import evaluate
  c = small_config("", **{"model.dtype": "bfloat16"})
  t = loop.build(c)
  state, frozen = jax.jit(t.init, out_shardings=(t.state_shardings, t.frozen_shardings))(
      jax.random.key(0))
  params = loop.merge_params(state["params"], frozen)
  s = t.batch_spec["image"].shape[1]
  images = np.random.default_rng(0).integers(0, 256, (8, s, s, 3)).astype(np.uint8)
  got = evaluate.predictor_factory(t.system, t.mesh)(params).run(
      "embed_image", common.Rows.of(image=images), 8)["embedding"]
  c32 = small_config("", **{"model.dtype": "float32"})
  g32 = mesh_lib.model_shapes(loop.build(c32).system.make_model, t.mesh, t.rules)[0]
  want = np.asarray(nnx.merge(g32, params).encode_image(jnp.asarray(images)))
  bf16 = np.asarray(nnx.merge(t.graphdef, params).encode_image(jnp.asarray(images)))
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.abs(bf16 - want).max() > 1e-4
