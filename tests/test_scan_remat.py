"""Scan over layers and rematerialisation change how the step is compiled, never what it computes or
how parameters are laid out (checkpoints and the PyTorch name map see one module per layer)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers.stack import REMAT_POLICIES

# Two layers in each stack: scan has more than one iteration in both.
SMALL = dict(vocab_size=64, image_size=16, patch_size=8, text_positions=16, width=16, heads=2,
             mlp_dim=32, out_dim=8, depth=2, vl_depth=2)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _cfg(**kw) -> m2_encoder.M2Config:
  return m2_encoder.config_for("tiny", **{**SMALL, **kw})


def _inputs(cfg):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 8)), jnp.int32)
  mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [5], [3], [1]]), jnp.int32)
  return images, ids, mask


def _value_and_grad(cfg, params):
  """Loss and gradients through the text tower (both stacks, padding masks), and the image
  embeddings, for `cfg` at `params`: one program, the text backward standing for both towers'."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0))))
  images, ids, mask = _inputs(cfg)

  def loss(p):
    ztxt = nnx.merge(graphdef, p).encode_text(ids, mask)
    return jnp.sum(ztxt * jnp.arange(ztxt.size, dtype=jnp.float32).reshape(ztxt.shape))

  def run(p):
    return jax.value_and_grad(loss)(p), nnx.merge(graphdef, p).encode_image(images)

  return jax.jit(run, compiler_options=FAST_COMPILE)(params)


@pytest.fixture(scope="module")
def params():
  # Random values of the model's shapes (no initialisation program to compile).
  rng = np.random.default_rng(0)
  abstract = nnx.eval_shape(lambda: m2_encoder.M2Encoder(_cfg(), rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype),
                      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


@pytest.fixture(scope="module")
def reference(params):
  return _value_and_grad(_cfg(), params)


@pytest.mark.parametrize("kw", [
    dict(scan_layers=True),
    dict(scan_layers=True, remat=True, remat_policy="dots"),
    dict(remat=True, remat_policy="dots_with_no_batch_dims"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_same_loss_and_gradients(params, reference, kw):
  (want_loss, want), want_img = reference
  (got_loss, got), got_img = _value_and_grad(_cfg(**kw), params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_img, want_img, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  layers = got["backbone"]["encoder"]["layers"]
  assert all(np.abs(layers[i]["ffn"]["B"]["fc1"]["kernel"]).max() > 0 for i in (0, 1))


def test_parameter_layout_does_not_depend_on_scan():
  def layout(cfg):
    state = nnx.state(nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0))),
                      nnx.Param)
    return {jax.tree_util.keystr(p): (a.shape, tuple(nnx.get_partition_spec(a) or ()))
            for p, a in jax.tree_util.tree_leaves_with_path(
                nnx.to_pure_dict(state))}, nnx.to_pure_dict(nnx.get_partition_spec(state))
  plain, plain_specs = layout(_cfg())
  scanned, scanned_specs = layout(_cfg(scan_layers=True, remat=True))
  assert plain.keys() == scanned.keys() and plain == scanned
  assert plain_specs == scanned_specs
  assert any("['layers'][1]" in k for k in plain)


def test_every_policy_is_accepted_and_unknown_ones_are_not():
  for name in REMAT_POLICIES:
    assert _cfg(remat=True, remat_policy=name).remat_policy == name
  with pytest.raises(ValueError, match="remat_policy"):
    _cfg(remat=True, remat_policy="sometimes")


def test_scanned_step_compiles_one_layer_per_stack():
  """The point of the scan: the lowered program holds the layer body once per stack and branch,
  not once per layer."""
  deep = dict(depth=4)
  def count_layers(cfg):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg,
                                                                             rngs=nnx.Rngs(0))))
    images, ids, mask = _inputs(cfg)
    fn = lambda s: nnx.merge(graphdef, s)(images, ids, mask)
    text = jax.jit(fn).lower(state).as_text()
    return text.count("erf")    # the exact GELU: one per layer body in the program
  assert count_layers(_cfg(scan_layers=True, **deep)) < count_layers(_cfg(**deep))
