"""Evaluation data and evaluators from the config: JSON-lines and TFDS sources end to end (no
TensorFlow), class names and templates, the sharded encoder's padding, config validation."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO


# ---------------------------------------------------------------------------- fixtures
def _world_records(world_dir, n):
  from bigvl.data import pipeline
  files = sorted(glob.glob(os.path.join(world_dir, "eval_heldout-*.array_record")))
  return pipeline.load_examples(files)[:n]


def write_jsonl_set(world_dir, out_dir, n=10):
  """n world images as files and a reference-format JSON-lines file naming them. The last line
  repeats the first image (its captions join that image's), and two images share a caption."""
  records = _world_records(world_dir, n)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  lines = []
  for i, r in enumerate(records):
    path = f"images/{i}.jpg"
    with open(os.path.join(out_dir, path), "wb") as f:
      f.write(r["image"])
    caps = [r["meta"]["captions"]["en"], r["meta"]["captions"]["zh"]]
    lines.append({"image": path, "caption": caps, "label": int(r["meta"]["class"])})
  lines[1]["caption"].append("a shape")
  lines[2]["caption"].append("a shape")
  lines.append({"image": "images/0.jpg", "caption": ["an extra caption"],
                "label": lines[0]["label"]})
  path = os.path.join(out_dir, "test.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  return path


def build_tfds_set(world_dir, data_dir, n=10):
  """A TFDS dataset in the ArrayRecord format, prepared here without TensorFlow: world images with
  a ClassLabel of the world's class names and a sequence of captions, as coco_captions has."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import io
  from data_pipelines import synthetic_world
  records = _world_records(world_dir, n)

  class BigvlTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(
              names=[c["en"].replace(" ", "_") for c in synthetic_world.CLASSES]),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      }))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, r in enumerate(records):
        # A file object: TFDS stores the encoded bytes as they are (an array would need TF).
        yield i, {"image": io.BytesIO(r["image"]), "label": int(r["meta"]["class"]),
                  "captions": {"text": [r["meta"]["captions"]["en"], r["meta"]["captions"]["zh"]]}}

  builder = BigvlTinyShapes(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return "bigvl_tiny_shapes"


# ---------------------------------------------------------------------------- unit tests
def test_padded_batches_cover_every_row_once():
  from bigvl.evaluators import common
  for n, local, procs in [(7, 4, 2), (1, 4, 3), (36, 4, 2), (10, 3, 4), (8, 8, 1)]:
    per_process = [common.padded_batches(n, local, p, procs) for p in range(procs)]
    assert len({len(b) for b in per_process}) == 1, (n, local, procs)   # same number of steps
    idx = np.concatenate([np.concatenate(b) for b in per_process])
    assert sorted(idx[idx >= 0].tolist()) == list(range(n)), (n, local, procs)
    assert all(len(x) == local for b in per_process for x in b)


def test_sharded_encoder_pads_and_keeps_row_order():
  import jax
  import jax.numpy as jnp
  from bigvl.evaluators import common
  from bigvl.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  towers = {"image": lambda p, b: b["image"].reshape(len(b["image"]), -1)[:, :2] * p}
  make = common.sharded_encoder(towers, mesh, batch_size=3)
  enc = make(jnp.float32(2.0))
  images = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
  rows = common.Rows(7, lambda idx: {"image": images[idx], "label": idx * 10})
  got = enc.embed("image", rows)
  np.testing.assert_array_equal(got["embedding"], images.reshape(7, -1)[:, :2] * 2)
  np.testing.assert_array_equal(got["label"], np.arange(7) * 10)
  assert enc._global_batch(None) % jax.device_count() == 0


def test_jsonl_source_merges_repeated_images_and_guesses_languages(tiny_world, tmp_path):
  from bigvl.evaluators import sources
  path = write_jsonl_set(tiny_world, str(tmp_path), n=4)
  data = sources.jsonl(path, 24)
  assert len(data) == 4                              # the 5th line repeats image 0
  assert data.captions[0][-1] == ("en", "an extra caption")
  assert [lang for lang, _ in data.captions[1]] == ["en", "zh", "en"]
  assert data.images.load(np.array([3, 0]))["image"].shape == (2, 24, 24, 3)
  assert len(data.labels) == 4
  assert len(sources.jsonl(path, 24, max_examples=2)) == 2
  os.remove(tmp_path / "images" / "2.jpg")
  with pytest.raises(FileNotFoundError, match="2.jpg"):
    sources.jsonl(path, 24)


def test_classnames_and_templates(tmp_path):
  from bigvl.evaluators import build, templates
  (tmp_path / "en.txt").write_text("cat\ndog\n")
  (tmp_path / "zh.txt").write_text("猫\n狗\n", encoding="utf-8")
  (tmp_path / "both.json").write_text(json.dumps({"en": ["cat"], "zh": ["猫"]}))
  assert build.load_classnames(f"en:{tmp_path}/en.txt,zh:{tmp_path}/zh.txt", []) == {
      "en": ["cat", "dog"], "zh": ["猫", "狗"]}
  assert build.load_classnames(f"{tmp_path}/zh.txt", []) == {"zh": ["猫", "狗"]}   # guessed
  assert build.load_classnames(f"{tmp_path}/both.json", [])["zh"] == ["猫"]
  t = templates.load("clip")
  assert set(t) == {"en", "zh"} and len(t["en"]) >= 10 and len(t["zh"]) >= 10
  assert all(s.count("{}") == 1 for ts in t.values() for s in ts)
  (tmp_path / "bad.json").write_text(json.dumps({"en": ["no slot"]}))
  with pytest.raises(ValueError, match="exactly one"):
    templates.load(str(tmp_path / "bad.json"))
  (tmp_path / "two.json").write_text(json.dumps({"en": ["{} and {plural}"]}))
  with pytest.raises(ValueError, match="exactly one"):
    templates.load(str(tmp_path / "two.json"))


def test_class_names_with_forms_fill_counted_templates(tmp_path):
  from bigvl.evaluators import build, common, templates
  (tmp_path / "t.json").write_text(json.dumps({"en": ["one {}.", "two {plural}."]}))
  (tmp_path / "n.json").write_text(json.dumps(
      {"en": [{"name": "red cross", "plural": "red crosses"}, "sheep"]}))
  table = templates.load(str(tmp_path / "t.json"))
  names = build.load_classnames(str(tmp_path / "n.json"), [])["en"]
  assert names[0] == {"name": "red cross", "plural": "red crosses"} and names[1] == "sheep"
  assert [common.format_prompt(t, names[0]) for t in table["en"]] == [
      "one red cross.", "two red crosses."]
  assert common.format_prompt("one {}.", "sheep") == "one sheep."
  with pytest.raises(ValueError, match="needs the form 'plural'.*sheep"):
    common.format_prompt("two {plural}.", "sheep")
  (tmp_path / "bad.json").write_text(json.dumps({"en": [{"plural": "sheep"}]}))
  with pytest.raises(ValueError, match="no \"name\" form"):
    build.load_classnames(str(tmp_path / "bad.json"), [])

  # The world's own prompts: every count, singular and plural in English.
  from data_pipelines import synthetic_world as w
  k = w.HELD_OUT[0]
  prompts = [common.format_prompt(t, w.zeroshot_name(k, "en")) for t in w.ZEROSHOT_TEMPLATES["en"]]
  assert f"a photo of one {w.CLASSES[k]['en']}." in prompts
  assert f"there are three {w.CLASSES[k]['en_plural']} in the image." in prompts
  zh = [common.format_prompt(t, w.zeroshot_name(k, "zh")) for t in w.ZEROSHOT_TEMPLATES["zh"]]
  assert f"图中有两个{w.CLASSES[k]['zh']}。" in zh


def test_eval_entries_are_validated(tmp_path):
  from bigvl.train import config_lib
  c = config_lib.base_config()
  c.evals.f30k = config_lib.eval_config(kind="retrieval", source="jsonl:/nonexistent.jsonl")
  with pytest.raises(config_lib.ConfigError, match="no such file"):
    config_lib.validate(c)
  c.evals.f30k.source = "flickr"
  with pytest.raises(config_lib.ConfigError, match="tfds:NAME"):
    config_lib.validate(c)
  c.evals.f30k.source = "tfds:flickr30k"
  c.evals.f30k.kind = ""
  with pytest.raises(config_lib.ConfigError, match="kind"):
    config_lib.validate(c)
  c.evals.f30k.kind = "retrieval"
  config_lib.validate(c)
  c.evals.f30k.souce = "x"     # a misspelt key of a named entry
  with pytest.raises(config_lib.ConfigError, match="evals.f30k.souce"):
    config_lib.validate(c)
  shards = config_lib.pretrain_on_shards("tiny", 8)
  assert all(not ev.source for ev in shards.evals.values())   # the paper's evals start off
  shards.evals.coco.source = "world"
  shards.data.train_files = __file__
  shards.tokenizer.path = __file__
  with pytest.raises(config_lib.ConfigError, match="synthetic_world"):
    config_lib.validate(shards)


# ---------------------------------------------------------------------------- end to end
_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
      # `import tensorflow` fails here even where TensorFlow is installed.
      def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return importlib.machinery.ModuleSpec(name, self)

      def create_module(self, spec):
        raise ModuleNotFoundError(f"{spec.name} is blocked in this test", name=spec.name)

      def exec_module(self, module):
        pass

    sys.meta_path.insert(0, NoTensorFlow())
    sys.path.insert(0, "tests")
    from conftest import small_config
    from bigvl.train import config_lib, evaluate, loop

    world, workdir, jsonl, tfds_dir, tfds_name = sys.argv[1:6]
    c = small_config(world, total_steps=2, checkpoint_every=2)
    E = config_lib.eval_config
    with c.unlocked():
      c.evals.zeroshot.batch_size = c.evals.retrieval.batch_size = 16
      c.evals.tfds_zs = E(kind="zeroshot", source="tfds:" + tfds_name, split="test",
                          data_dir=tfds_dir, batch_size=16, templates="simple")
      c.evals.tfds_ret = E(kind="retrieval", source="tfds:" + tfds_name, split="test",
                           data_dir=tfds_dir, batch_size=16)
      c.evals.jsonl_ret = E(kind="retrieval", source="jsonl:" + jsonl, batch_size=16)
      c.evals.jsonl_zs = E(kind="zeroshot", source="jsonl:" + jsonl, batch_size=16,
                           classnames=sys.argv[6], langs="en", templates="simple")
    trained = loop.train(c, workdir)
    evaluated = evaluate.evaluate(c, workdir)
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    print("RESULT", json.dumps({"trained": trained, "evaluated": evaluated, "tf": loaded}))
""")


def test_tfds_and_jsonl_sources_evaluate_end_to_end_without_tensorflow(tiny_world, tmp_path):
  from data_pipelines import synthetic_world
  tfds_name = build_tfds_set(tiny_world, str(tmp_path / "tfds"), n=10)
  jsonl = write_jsonl_set(tiny_world, str(tmp_path / "jsonl"), n=10)
  classnames = tmp_path / "classes_en.txt"
  classnames.write_text("\n".join(c["en"] for c in synthetic_world.CLASSES))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _SCRIPT, tiny_world, str(tmp_path / "run"), jsonl,
                      str(tmp_path / "tfds"), tfds_name, str(classnames)],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split("RESULT ", 1)[1])
  assert out["tf"] == []
  trained, evaluated = out["trained"], out["evaluated"]
  keys = ["tfds_zs/en/top1", "tfds_zs/en/top5", "tfds_zs/chance_top1",
          "tfds_ret/i2t/r1", "tfds_ret/t2i/r10", "tfds_ret/mr", "tfds_ret/en/i2t/r1",
          "tfds_ret/zh/t2i/r1", "jsonl_ret/mr", "jsonl_zs/en/top1", "zeroshot/en/top1"]
  for k in keys:
    assert 0.0 <= evaluated[k] <= 1.0, k
    assert evaluated[k] == pytest.approx(trained[k], abs=1e-6), k   # training's evals = the CLI's
  # TFDS label names are English only; every class of the world is a candidate.
  assert "tfds_zs/zh/top1" not in evaluated
  assert evaluated["tfds_zs/chance_top1"] == pytest.approx(1 / len(synthetic_world.CLASSES))
  # The JSON-lines set has the same 10 images with extra captions; 10 images, 2 captions each.
  assert evaluated["tfds_ret/chance/t2i/r1"] == pytest.approx(1 / 10)
  assert evaluated["tfds_ret/chance/i2t/r1"] == pytest.approx(2 / 20)
