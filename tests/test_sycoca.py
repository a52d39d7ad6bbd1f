"""SyCoCa: the model's pieces, its loss decomposition (GradCache), a short training run with every
evaluator, launch/caption.py and the towers' export."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.losses import mim as mim_loss
from bigvl.models import m2_encoder, sycoca
from bigvl.models.layers import masking
from bigvl.models.layers.attention import Attention, dot_product_attention
from bigvl.models.layers.factories import Linears
from bigvl.evaluators import masked_modelling

from conftest import REPO, small_config

TINY = dict(width=32, heads=2, depth=1, vl_depth=1, mlp_dim=64, out_dim=16, patch_size=8,
            image_size=24, text_positions=64)


def _model(seed=0, **kw):
  cfg = sycoca.SyCoCaConfig(towers=m2_encoder.config_for("tiny", vocab_size=100, **TINY),
                            caption_len=23, mim_depth=1, decoder_depth=1, **kw)
  return sycoca.SyCoCa(cfg, rngs=nnx.Rngs(seed))


def _images(b=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, 24, 24, 3)), jnp.uint8)


def test_attention_weights_are_what_the_layer_weights_values_with():
  make = Linears(nnx.Rngs(0))
  attn = Attention(16, num_heads=2, linear=make.linear)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)), jnp.float32)
  key_mask = jnp.asarray([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  w = attn.weights(x, key_mask=key_mask)                        # (B, heads, L, L)
  v = attn.v_proj(x).reshape(2, 5, 2, 8)
  out = attn.out_proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 5, 16))
  np.testing.assert_allclose(out, attn(x, key_mask=key_mask), atol=1e-5)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert float(w[0, :, :, 3].max()) == 0.0                      # a padded key gets nothing


def test_cls_attention_and_the_visible_pass():
  m = _model()
  images = _images()
  tokens, attention = m.image_tokens(images, cls_attention=True)
  np.testing.assert_allclose(tokens, m.image_tokens(images), atol=1e-6)   # same forward pass
  assert attention.shape == (3, 9) and np.allclose(attention.sum(-1) <= 1.0 + 1e-6, True)
  # The MAE-style pass over every patch is the full pass; over a subset it depends on that
  # subset only: the hidden patches do not leak into the visible tokens.
  every = jnp.tile(jnp.arange(9)[None], (3, 1))
  np.testing.assert_allclose(m.visible_tokens(images, every), tokens, atol=1e-5)
  masked, visible = masking.split_by_score(attention, 4)
  assert sorted(np.concatenate([masked[0], visible[0]]).tolist()) == list(range(9))
  a = m.visible_tokens(images, visible)
  grid = images.reshape(3, 3, 8, 3, 8, 3)
  hidden = np.asarray(masking.index_mask(masked, 9)).reshape(3, 3, 1, 3, 1, 1)
  changed = jnp.where(jnp.asarray(hidden), 255 - grid, grid).reshape(images.shape)
  np.testing.assert_allclose(m.visible_tokens(changed.astype(jnp.uint8), visible), a, atol=1e-5)


def test_patchify_and_the_masked_loss():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  p = mim_loss.patchify(x, 2)
  assert p.shape == (2, 4, 12)
  np.testing.assert_array_equal(p[0, 1].reshape(2, 2, 3), x[0, 0:2, 2:4])   # row-major patches
  t = mim_loss.normalize_patches(p)
  np.testing.assert_allclose(t.mean(-1), 0, atol=1e-5)
  pred = t.at[:, 0].add(1.0)                       # only patch 0 is wrong, by 1 everywhere
  assert mim_loss.masked_patch_l2(pred, t, jnp.asarray([[0], [0]])).tolist() == [1.0, 1.0]
  assert mim_loss.masked_patch_l2(pred, t, jnp.asarray([[1, 2], [3, 1]])).tolist() == [0.0, 0.0]


def test_object_patches_and_iou():
  mask = np.zeros((6, 6), bool)
  mask[0:2, 0:2] = True                            # all of patch 0 of a 3x3 grid
  mask[2, 2] = True                                # a quarter of patch 4
  np.testing.assert_array_equal(masked_modelling.object_patches(mask, 3),
                                [1, 0, 0, 0, 1, 0, 0, 0, 0])
  a = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
  b = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], bool)
  np.testing.assert_allclose(masked_modelling.iou(a, b), [0.5, 0.0])


def _system(tiny_world, **overrides):
  from bigvl import systems
  from bigvl.parallel import mesh as mesh_lib
  c = sycoca_config(tiny_world, **overrides)
  mesh = mesh_lib.make_mesh(dict(c.mesh))
  s = systems.build(c, mesh, mesh_lib.config_rules(c))
  s.prepare(None)
  return s


def sycoca_config(world_dir, **overrides):
  """configs/sycoca_tiny.py at small_config's sizes, one layer per decoder."""
  c = small_config(world_dir, "sycoca_tiny", **{"model.decoder_depth": 1, "model.mim_depth": 1,
                                                **overrides})
  for entry in c.evals.values():
    entry.batch_size = 64
  return c


@pytest.mark.parametrize("masking_rule", [
    "similarity", pytest.param("attention", marks=pytest.mark.slow),
    pytest.param("random", marks=pytest.mark.slow)])
def test_gradcache_equals_the_plain_gradient(tiny_world, masking_rule):
  s1 = _system(tiny_world, **{"loss.masking": masking_rule})
  s2 = _system(tiny_world, **{"loss.masking": masking_rule, "loss.accum_steps": 2})
  model = s1.make_model(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {k: jnp.asarray(v) for k, v in s1.fake_batch(32).items()}   # 2 rows per shard and step
  rng = jax.random.key(3)
  (l1, a1), g1 = s1.value_and_grad(graphdef, params, nnx.State({}), batch, rng)
  (l2, a2), g2 = s2.value_and_grad(graphdef, params, nnx.State({}), batch, rng)
  assert {"itc", "ic", "tgmim", "ic_token_acc"} <= set(a1)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=2e-5)
  assert float(l1) == pytest.approx(float(a1["itc"] + 2 * a1["ic"] + a1["tgmim"]), rel=1e-5)


def test_a_zero_weight_drops_its_head(tiny_world):
  s = _system(tiny_world, **{"loss.mim_weight": 0.0, "loss.ic_weight": 0.0})
  model = s.make_model(nnx.Rngs(0))
  loss, aux = s.loss(model, {k: jnp.asarray(v) for k, v in s.fake_batch(16).items()},
                     jax.random.key(0))
  assert "ic" not in aux and "tgmim" not in aux
  assert float(loss) == pytest.approx(float(aux["itc"]))


def test_bad_sycoca_keys_are_one_line_errors(tiny_world):
  from bigvl.train import config_lib
  for key, value, words in (("loss.masking", "cls", "loss.masking"),
                            ("loss.mask_ratio", 1.0, "mask_ratio"),
                            ("decode.lang", "fr", "decode.lang")):
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.validate(sycoca_config(tiny_world, **{key: value}))


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
  from bigvl.train import loop
  wd = str(tmp_path_factory.mktemp("sycoca") / "run")
  # Zero-shot over all classes and retrieval run as for M²-Encoder (tests/test_train.py): off here.
  out = loop.train(sycoca_config(tiny_world, total_steps=3, checkpoint_every=3,
                                 **{"evals.zeroshot_all.source": "", "evals.retrieval.source": ""}),
                   wd)
  return wd, out


def test_training_runs_every_evaluator(trained):
  _, out = trained
  for key in ("zeroshot/en/top1", "caption/en/cider", "caption/zh/cider",
              "caption/en/bleu4", "caption/zh/bleu4", "tgmim/true_vs_shuffled",
              "attn_mask/iou", "attn_mask/iou_random"):
    assert key in out and np.isfinite(out[key]), key
  assert 0 < out["attn_mask/chosen_patch_fraction"] < 1


def test_caption_cli_writes_json_lines(trained, tiny_world, tmp_path):
  from PIL import Image
  wd, _ = trained
  for i in range(3):
    Image.fromarray(np.full((30, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
  out = tmp_path / "caps.jsonl"
  env = dict(os.environ, BIGVL_DATA_DIR=tiny_world)
  for lang, beam in (("zh", 2),):   # greedy decoding in English is what training's eval runs
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch/caption.py"), f"--workdir={wd}",
                        f"--images={tmp_path}/p*.png", f"--lang={lang}", f"--beam={beam}",
                        f"--json={out}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [os.path.basename(row["image"]) for row in rows] == ["p0.png", "p1.png", "p2.png"]
    assert all(row["lang"] == lang and row["beam"] == beam and isinstance(row["caption"], str)
               and row["step"] == 3 for row in rows)
    assert len(r.stdout.strip().splitlines()) == 3
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/caption.py"), f"--workdir={wd}",
                      f"--images={tmp_path}/none*.png"], capture_output=True, text=True, env=env)
  assert r.returncode != 0 and "no image matches --images" in r.stderr


def test_the_towers_export_to_the_released_layout(trained, tmp_path):
  pytest.importorskip("torch")
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import export_torch
  wd, _ = trained
  src, params = export_torch.export(wd, str(tmp_path / "torch"))
  assert src.subtree == "towers" and "caption_decoder" not in params
  assert export_torch.check(src, params, str(tmp_path / "torch"))["max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_the_demo_reaches_its_bars(tmp_path):
  """configs/sycoca_tiny.py as the README runs it (10 minutes here): the held-out bars of issue 17."""
  wd = tmp_path / "demo"
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/train.py"),
                      "--config=configs/sycoca_tiny.py", f"--workdir={wd}"], cwd=REPO,
                     capture_output=True, text=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  final = [row for row in rows if "caption/en/cider" in row][-1]
  for lang in ("en", "zh"):
    assert final[f"zeroshot/{lang}/top1"] >= 0.7
    assert final[f"caption/{lang}/cider"] >= 1.0
  assert final["tgmim/true_vs_shuffled"] <= 0.8
  assert final["attn_mask/iou"] >= 2 * final["attn_mask/iou_random"]


@pytest.mark.slow
def test_m2_sycoca_0p4b_fits_a_v5p_64_slice(tmp_path):
  pytest.importorskip("libtpu")
  out = tmp_path / "plan.json"
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/plan.py"),
                      "--config=configs/m2_sycoca_0p4b.py", "--topology=v5p-64", f"--json={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["fits"] and report["global_batch"] == 8192
