"""Switch-BERT on the protocol: scene batches, the annealed temperature, frozen towers, the three
heads' losses, training with both evaluators, and the config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import towers_config



def sb_config(world, backbone_dir, **overrides):
  return towers_config("switch_bert", world, backbone_dir, **{
      "model.fusion_width": 16, "model.fusion_heads": 2, "model.fusion_mlp_dim": 32,
      "total_steps": 2, "loss.tau_start": 2.0, "loss.tau_end": 0.5, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_world, m2_backbone, tmp_path_factory):
  from bigvl.train import loop
  wd = str(tmp_path_factory.mktemp("sb") / "run")
  return wd, loop.train(sb_config(tiny_world, m2_backbone), wd)


def test_training_runs_both_evaluators(trained):
  _, out = trained
  for key in ("vqa/acc", "vqa/chance", "vqa/prior", "referring/acc_iou0.5", "referring/chance",
              "itm/pair_acc", "itm/acc",
              "train/tau", "train/switch/l0/text/joint", "train/switch/l1/image/depth_weight"):
    assert key in out and np.isfinite(out[key]), key
  assert 0 < out["vqa/chance"] < 1 and 0 < out["referring/chance"] < 1
  # tau after the first of two updates: exp-annealed from 2.0 halfway to 0.5
  assert out["train/tau"] == pytest.approx(1.0, rel=1e-4)


def test_towers_are_frozen_and_the_switch_is_trained(tiny_world, m2_backbone):
  from bigvl import systems
  from bigvl.parallel import mesh as mesh_lib
  from bigvl.train import config_lib
  c = sb_config(tiny_world, m2_backbone)
  config_lib.validate(c)
  mesh = mesh_lib.make_mesh(dict(c.mesh), jax.devices()[:1])
  system = systems.build(c, mesh, mesh_lib.config_rules(c))
  system.prepare(None)
  model = system.make_model(nnx.Rngs(0))
  graphdef, params, frozen = nnx.split(model, system.trainable, ...)
  assert "towers" not in params and "fusion" in params
  batch = {k: jnp.asarray(v) for k, v in system.fake_batch(8).items()}
  (loss, aux), grads = system.value_and_grad(graphdef, params, frozen, batch, jax.random.key(0))
  assert np.isfinite(float(loss)) and {"vqa", "itm", "refer", "refer_acc"} <= set(aux)
  g = grads["fusion"]["encoder"]
  assert float(jnp.abs(g["alpha_logits"][...]).sum()) > 0
  assert float(jnp.abs(g["beta_logits"][...]).sum()) > 0


def test_bad_switch_bert_keys_are_one_line_errors(tiny_world, m2_backbone):
  from bigvl.train import config_lib
  for key, value, words in (("model.modes", "two_stream", "model.modes"),
                            ("model.selection", "argmax", "model.selection"),
                            ("model.fusion_heads", 3, "fusion_heads"),
                            ("loss.tau_end", 0.0, "tau_end")):
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.validate(sb_config(tiny_world, m2_backbone, **{key: value}))


@pytest.mark.slow
def test_the_demo_reaches_its_bars(tmp_path):
  """configs/switch_bert_tiny.py as the README runs it (the m2_tiny backbone trained first when
  the cache has none): held-out VQA and referring accuracy at least twice chance."""
  import json
  import os
  import subprocess
  import sys
  from conftest import REPO
  wd = tmp_path / "demo"
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/train.py"),
                      "--config=configs/switch_bert_tiny.py", f"--workdir={wd}"], cwd=REPO,
                     capture_output=True, text=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  final = [row for row in rows if "vqa/acc" in row][-1]
  assert final["vqa/acc"] >= 2 * final["vqa/chance"]
  assert final["referring/acc_iou0.5"] >= 2 * final["referring/chance"]
