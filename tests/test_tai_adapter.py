"""The text-as-image adapter: text-only training on frozen towers, the perturbation, the losses,
the multi-label evaluator on the scene world and on COCO-instances files, and the config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import towers_config



def tai_config(world, backbone_dir, **overrides):
  return towers_config("tai_adapter", world, backbone_dir,
                       **{"data.num_sentences": 200, "total_steps": 3, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_world, m2_backbone, tmp_path_factory):
  """A TaI run whose towers could never see an image in training: image_features raises there."""
  from bigvl.models import m2_encoder
  from bigvl.train import loop
  wd = str(tmp_path_factory.mktemp("tai") / "run")
  real = m2_encoder.M2Encoder.image_features
  calls = {}

  def guarded(self, images):
    if calls.get("phase") == "train":
      raise AssertionError("an image reached the adapter's training step")
    return real(self, images)

  m2_encoder.M2Encoder.image_features = guarded
  from bigvl.systems.tai_adapter import system as tai_system
  orig_loss = tai_system.TaIAdapterSystem.loss

  def loss(self, model, batch, rng):
    assert set(batch) == {"text", "text_mask", "labels"}, sorted(batch)
    calls["phase"] = "train"
    try:
      return orig_loss(self, model, batch, rng)
    finally:
      calls["phase"] = "eval"

  tai_system.TaIAdapterSystem.loss = loss
  try:
    out = loop.train(tai_config(tiny_world, m2_backbone), wd)
  finally:
    m2_encoder.M2Encoder.image_features = real
    tai_system.TaIAdapterSystem.loss = orig_loss
  return wd, out


def test_text_only_training_leaves_the_backbone_bytes_alone(trained, m2_backbone):
  import orbax.checkpoint as ocp
  from bigvl.export import params_io
  wd, out = trained
  for key in ("multilabel/map", "multilabel/zeroshot_map", "multilabel/chance_map",
              "multilabel/cf1", "multilabel/of1"):
    assert key in out and np.isfinite(out[key]), key
  assert 0 < out["multilabel/chance_map"] < out["multilabel/zeroshot_map"] + 1
  source = params_io.load_params(m2_backbone)
  frozen = ocp.PyTreeCheckpointer().restore(os.path.join(wd, "frozen"))
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  a, b = flat(source), flat(frozen["towers"])
  assert set(a) == set(b) and a
  for k in a:
    assert a[k].tobytes() == b[k].tobytes(), k
  trained_params = params_io.load_params(wd)
  assert "towers" not in trained_params
  assert np.abs(np.asarray(trained_params["adapter"]["up"])).sum() > 0   # the adapter moved
  with open(os.path.join(wd, "init_from.json")) as f:
    report = json.load(f)
  assert report["into"] == "towers" and not [k for k in report["left_at_init"]
                                             if k.startswith("towers/")]


def test_perturbation_forms():
  from bigvl.models import tai_adapter
  e = jax.random.normal(jax.random.key(0), (512, 64)) * 3.0
  key = jax.random.key(1)
  assert (tai_adapter.perturb(e, key, "none", 0.5) == e).all()
  g = tai_adapter.perturb(e, key, "gaussian", 0.2) - e
  assert float(jnp.std(g)) == pytest.approx(0.2, rel=0.05)
  r = tai_adapter.perturb(e, key, "relative", 0.5) - e
  ratio = jnp.linalg.norm(r, axis=-1) / jnp.linalg.norm(e, axis=-1)
  assert float(ratio.mean()) == pytest.approx(0.5, rel=0.05)
  with pytest.raises(ValueError, match="noise"):
    tai_adapter.perturb(e, key, "uniform", 0.1)


def test_the_losses_against_numpy():
  from bigvl.losses import multilabel
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32) * 3
  t = (rng.random((6, 5)) < 0.4).astype(np.float32)
  p = 1 / (1 + np.exp(-x))
  ref = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(-1).mean()
  assert float(multilabel.binary_cross_entropy(x, t)) == pytest.approx(ref, rel=1e-5)
  assert float(multilabel.asymmetric_loss(x, t, gamma_pos=0, gamma_neg=0, clip=0)) == \
      pytest.approx(ref, rel=1e-5)
  pm = np.maximum(p - 0.05, 0)
  asl = -(t * np.log(p) + (1 - t) * pm ** 4 * np.log(1 - pm)).sum(-1).mean()
  assert float(multilabel.asymmetric_loss(x, t)) == pytest.approx(asl, rel=1e-5)


def test_coco_instances_files_evaluate(trained, tiny_world, tmp_path):
  """A COCO-instances-style file the test writes is read and scored with the trained adapter."""
  from PIL import Image
  from bigvl.evaluators import kinds, multilabel
  from bigvl.train import evaluate
  wd, _ = trained
  colours = {"red circle": (220, 30, 35), "blue square": (35, 80, 225)}
  images, anns = [], []
  for i in range(6):
    name = f"{i:03d}.jpg"
    Image.new("RGB", (40, 30), (128, 128, 128)).save(tmp_path / name)
    images.append({"id": i, "file_name": name, "width": 40, "height": 30})
    anns += [{"id": 10 * i + k, "image_id": i, "category_id": k + 1, "bbox": [0, 0, 5, 5]}
             for k in range(2) if (i >> k) & 1]
  cats = [{"id": k + 1, "name": n} for k, n in enumerate(colours)]
  path = tmp_path / "instances_val.json"
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  loaded = evaluate.load(evaluate.run_config(wd), wd)
  entry = kinds.eval_config(kind="multilabel", source=f"coco:{path}", langs="en", batch_size=64)
  ev = multilabel.MultiLabelEvaluator.from_config("coco_ml", entry, tokenizer=loaded.tokenizer,
                                                  image_size=loaded.system.image_size())
  np.testing.assert_array_equal(ev.labels, [[(i >> k) & 1 for k in range(2)] for i in range(6)])
  out = ev.run(loaded.predictor)
  assert {"coco_ml/map", "coco_ml/zeroshot_map", "coco_ml/chance_map"} <= set(out)
  assert all(np.isfinite(v) for v in out.values())


def test_bad_tai_keys_are_one_line_errors(tiny_world, m2_backbone):
  from bigvl.train import config_lib
  for key, value, words in (("loss.noise", "uniform", "loss.noise"),
                            ("loss.kind", "focal", "loss.kind"),
                            ("data.kind", "shards", "data.kind"),
                            ("data.labels", "/nonexistent/labels.txt", "data.labels")):
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.validate(tai_config(tiny_world, m2_backbone, **{key: value}))


def _demo(workdir, *flags):
  import subprocess
  import sys
  from conftest import REPO
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/train.py"),
                      "--config=configs/tai_adapter_tiny.py", f"--workdir={workdir}", *flags],
                     cwd=REPO, capture_output=True, text=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if "multilabel/map" in row][-1]


@pytest.mark.slow
def test_the_demo_reaches_its_bars(tmp_path):
  """configs/tai_adapter_tiny.py as the README runs it (the m2_tiny backbone trained first when the
  cache has none): the adapter beats the frozen towers' zero-shot mAP, and the perturbation beats
  none, on held-out scene pictures."""
  noisy = _demo(tmp_path / "demo")
  plain = _demo(tmp_path / "no_noise", "--config.loss.noise=none")
  assert noisy["multilabel/zeroshot_map"] > 2 * noisy["multilabel/chance_map"]
  assert noisy["multilabel/map"] > noisy["multilabel/zeroshot_map"] + 0.03
  assert plain["multilabel/map"] > plain["multilabel/zeroshot_map"]
  assert noisy["multilabel/map"] > plain["multilabel/map"]
