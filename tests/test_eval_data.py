"""Evaluation data and evaluators from the config: JSON-lines and TFDS sources end to end (no
TensorFlow), class names and templates, the sharded predictor's padding, the table of kinds and
entry validation, the world's zero-shot evaluator from its metadata files alone."""

import glob
import shutil
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
  from bigvl.data.formats import image_text
  files = sorted(glob.glob(os.path.join(world_dir, "eval_heldout-*.array_record")))
  return image_text.load_examples(files)[:n]


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


def build_tfds_set(world_dir, data_dir, n=10, split="test"):
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
      return {split: self._generate_examples()}

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


def test_sharded_predictor_pads_and_keeps_row_order():
  import jax
  import jax.numpy as jnp
  from bigvl.evaluators import common
  from bigvl.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})

  def embed_image(p, b):
    flat = b["image"].reshape(len(b["image"]), -1)
    return {"embedding": flat[:, :2] * p, "total": flat.sum(-1)}
  make = common.sharded_predictor({"embed_image": embed_image}, mesh, batch_size=3)
  assert make.names == ("embed_image",)
  predictor = make(jnp.float32(2.0))
  assert predictor.names == ("embed_image",)
  images = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
  rows = common.Rows(7, lambda idx: {"image": images[idx], "label": idx * 10})
  got = predictor.run("embed_image", rows)
  assert sorted(got) == ["embedding", "label", "total"]      # every output, and the passthrough
  np.testing.assert_array_equal(got["embedding"], images.reshape(7, -1)[:, :2] * 2)
  np.testing.assert_array_equal(got["total"], images.reshape(7, -1).sum(-1))
  np.testing.assert_array_equal(got["label"], np.arange(7) * 10)
  assert predictor._global_batch(None) % jax.device_count() == 0
  # A larger batch than the rows: one padded batch, the same rows.
  np.testing.assert_array_equal(predictor.run("embed_image", rows, 64)["total"], got["total"])
  with pytest.raises(KeyError, match="embed_text"):
    predictor.run("embed_text", rows)
  clash = common.sharded_predictor({"f": lambda p, b: {"label": b["image"][:, 0, 0, 0]}}, mesh, 8)
  with pytest.raises(ValueError, match="label"):
    clash(jnp.float32(1.0)).run("f", rows)


def test_evaluators_run_the_sharded_predictors():
  # The hand-built zero-shot case of test_eval_metrics, through jitted predictors on 8 devices (a
  # batch of 3 rounds up to 8: the images and the prompts are each one padded batch).
  import jax.numpy as jnp
  from bigvl.evaluators import common, zeroshot
  from bigvl.parallel import mesh as mesh_lib
  from test_eval_metrics import _Tokenizer
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  make = common.sharded_predictor({
      "embed_image": lambda p, b: {"embedding": b["image"]},
      "embed_text": lambda p, b: {"embedding": p[b["text"][:, 0]]},
  }, mesh, batch_size=3)
  table = jnp.array([[1, 0], [1, 1], [0, 1], [0, 1]], jnp.float32)
  images = np.array([[1, 0], [0.3, 1], [1, 0.9]], np.float32)
  ev = zeroshot.ZeroShotEvaluator(
      images=common.Rows.of(image=images, label=np.array([0, 1, 1])), labels=None,
      classnames={"en": ["a", "b"]}, templates={"en": ["x {}", "y {}"]},
      tokenizer=_Tokenizer(["x a", "y a", "x b", "y b"]), prefix="zs", batch_size=3)
  assert ev.run(make(table))["zs/en/top1"] == pytest.approx(2 / 3)


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
  from bigvl.evaluators import templates, zeroshot
  (tmp_path / "en.txt").write_text("cat\ndog\n")
  (tmp_path / "zh.txt").write_text("猫\n狗\n", encoding="utf-8")
  (tmp_path / "both.json").write_text(json.dumps({"en": ["cat"], "zh": ["猫"]}))
  assert zeroshot.load_classnames(f"en:{tmp_path}/en.txt,zh:{tmp_path}/zh.txt", []) == {
      "en": ["cat", "dog"], "zh": ["猫", "狗"]}
  assert zeroshot.load_classnames(f"{tmp_path}/zh.txt", []) == {"zh": ["猫", "狗"]}   # guessed
  assert zeroshot.load_classnames(f"{tmp_path}/both.json", [])["zh"] == ["猫"]
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
  from bigvl.data.prompts import format_prompt
  from bigvl.evaluators import templates, zeroshot
  (tmp_path / "t.json").write_text(json.dumps({"en": ["one {}.", "two {plural}."]}))
  (tmp_path / "n.json").write_text(json.dumps(
      {"en": [{"name": "red cross", "plural": "red crosses"}, "sheep"]}))
  table = templates.load(str(tmp_path / "t.json"))
  names = zeroshot.load_classnames(str(tmp_path / "n.json"), [])["en"]
  assert names[0] == {"name": "red cross", "plural": "red crosses"} and names[1] == "sheep"
  assert [format_prompt(t, names[0]) for t in table["en"]] == [
      "one red cross.", "two red crosses."]
  assert format_prompt("one {}.", "sheep") == "one sheep."
  with pytest.raises(ValueError, match="needs the form 'plural'.*sheep"):
    format_prompt("two {plural}.", "sheep")
  (tmp_path / "bad.json").write_text(json.dumps({"en": [{"plural": "sheep"}]}))
  with pytest.raises(ValueError, match="no \"name\" form"):
    zeroshot.load_classnames(str(tmp_path / "bad.json"), [])

  # The world's own prompts: every count, singular and plural in English.
  from data_pipelines import synthetic_world as w
  k = w.HELD_OUT[0]
  prompts = [format_prompt(t, w.zeroshot_name(k, "en")) for t in w.ZEROSHOT_TEMPLATES["en"]]
  assert f"a photo of one {w.CLASSES[k]['en']}." in prompts
  assert f"there are three {w.CLASSES[k]['en_plural']} in the image." in prompts
  zh = [format_prompt(t, w.zeroshot_name(k, "zh")) for t in w.ZEROSHOT_TEMPLATES["zh"]]
  assert f"图中有两个{w.CLASSES[k]['zh']}。" in zh


def test_eval_entries_are_validated(tmp_path):
  # Through the config's validation (the loop's, then the system's, which calls validate_entry).
  from bigvl.evaluators import kinds
  from bigvl.systems.m2_encoder import config as m2_config
  from bigvl.train import config_lib
  c = config_lib.full_config("m2_encoder")
  c.evals.f30k = kinds.eval_config(kind="retrieval", source="jsonl:/nonexistent.jsonl")
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
  shards = m2_config.pretrain_on_shards("tiny", 8)
  assert all(not ev.source for ev in shards.evals.values())   # the paper's evals start off
  shards.evals.coco.source = "world"
  shards.data.train_files = __file__
  shards.tokenizer.path = __file__
  with pytest.raises(config_lib.ConfigError, match="synthetic_world"):
    config_lib.validate(shards)


def test_kind_table_and_entry_keys():
  from bigvl.evaluators import kinds, retrieval, zeroshot
  assert kinds.KINDS["zeroshot"] is zeroshot.ZeroShotEvaluator
  assert kinds.KINDS["retrieval"] is retrieval.RetrievalEvaluator
  from bigvl.systems.switch_bert import system as switch_bert_system
  from bigvl.systems.sycoca import system as sycoca_system
  from bigvl.systems.tai_adapter import system as tai_system
  from bigvl.systems.dmae import system as dmae_system
  given = [set(m.PREDICTORS) for m in (sycoca_system, tai_system, switch_bert_system)]
  given.append(set(dmae_system.DMAESystem.PREDICTORS))
  from bigvl.systems.snp_s3 import system as snp_system
  given.append(set(snp_system.SNPS3System.PREDICTORS))
  from bigvl.systems.tsgsv import system as tsgsv_system
  given.append(set(tsgsv_system.TSGSVSystem.PREDICTORS))
  for cls in kinds.KINDS.values():
    assert any(set(cls.requires) <= g for g in given)   # every kind runs on some system
    assert callable(cls.from_config) and callable(cls.validate_config)
    assert not set(cls.config_keys()) & set(kinds.COMMON)
  assert kinds.kind_of("zeroshot_all", {}) == "zeroshot"
  assert kinds.kind_of("anything", {"kind": "retrieval"}) == "retrieval"
  with pytest.raises(ValueError, match="set kind='zeroshot', 'retrieval', 'captioning', 'tgmim', "
                     "'attn_mask', 'multilabel', 'vqa', 'referring', 'itm', 'video_retrieval', "
                     "'video_qa' or 'grounding'"):
    kinds.kind_of("imagenet", {})
  with pytest.raises(ValueError, match="kind='captions'"):
    kinds.kind_of("x", {"kind": "captions"})
  common = ["kind", "every", "batch_size", "source", "split", "data_dir", "max_examples"]
  assert kinds.entry_keys("retrieval") == common + ["image_key", "caption_key", "text_preprocess",
                                                    "repeated_captions"]
  assert kinds.entry_keys("zeroshot") == common + ["classes", "classnames", "templates", "langs",
                                                   "image_key", "label_key"]
  assert set(kinds.entry_keys("")) == set(kinds.entry_keys("zeroshot") + [
      "caption_key", "text_preprocess", "repeated_captions", "langs_to_generate", "output", "topk",
      "answers", "annotations", "instances", "max_boxes", "num_frames", "text_weights", "video_dir",
      "tile", "choices", "formats", "features", "long", "short", "stride", "top", "nms",
      "max_points", "mcap_extension"])
  e = kinds.eval_config(kind="zeroshot", langs="zh")
  assert sorted(e) == sorted(kinds.entry_keys("zeroshot")) and e.langs == "zh"
  assert (e.every, e.batch_size, e.source, e.split, e.max_examples) == (0, 256, "world",
                                                                         "eval_heldout", 0)
  assert kinds.eval_config().caption_key == "captions/text"    # no kind: every kind's keys
  with pytest.raises(ValueError, match=r"no key \['classes'\] for kind 'retrieval'"):
    kinds.eval_config(kind="retrieval", classes="all")
  with pytest.raises(ValueError, match="kind='nope'"):
    kinds.eval_config(kind="nope")


def _one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as e:
    fn()
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


def test_entries_are_checked_per_kind(tmp_path):
  import ml_collections
  from bigvl.evaluators import kinds
  check = lambda name, entry, world=True: kinds.validate_entry(name, entry, has_world=world)
  check("f30k", kinds.eval_config(kind="retrieval"))
  check("retrieval_x", kinds.eval_config())        # every kind's keys, at their defaults
  # A key of another kind that is set, on an entry of explicit or implied kind.
  e = kinds.eval_config(kind="retrieval")
  with e.unlocked():
    e.classes = "all"
  _one_line_error(lambda: check("f30k", e), r"evals.f30k.classes='all': a key of kind zeroshot, "
                  r"not of 'retrieval'")
  _one_line_error(lambda: check("retrieval_x", kinds.eval_config(langs="zh")),
                  "evals.retrieval_x.langs='zh': a key of kind zeroshot")
  _one_line_error(lambda: check("zeroshot", kinds.eval_config(caption_key="text")),
                  "a key of kind retrieval, not of 'zeroshot'")
  # A key of no kind; a misspelt one gets a suggestion.
  e = kinds.eval_config(kind="zeroshot")
  with e.unlocked():
    e.clases = "all"
  _one_line_error(lambda: check("inet", e), r"unknown config key 'evals.inet.clases' \(did you "
                  r"mean 'evals.inet.classes'\?\): fix or remove it")
  # Today's one-line messages.
  E = kinds.eval_config
  for entry, match in [
      (E(kind="zeroshot", every=-1), r"evals.z.every=-1: must be >= 0"),
      (E(kind="zeroshot", batch_size=0), r"evals.z.batch_size=0: must be positive"),
      (E(kind="zeroshot", classes="some"), r"evals.z.classes='some': 'split' or 'all'"),
      (E(kind="zeroshot", max_examples=-2), r"evals.z.max_examples=-2: must be >= 0"),
      (E(kind="zeroshot", source="flickr"), r"evals.z: source='flickr': use 'world', 'tfds:NAME'"),
      (E(kind="retrieval", source="jsonl:/nonexistent.jsonl"), r"no such file"),
      (E(source="tfds:x"), r"evals.z: set kind="),
  ]:
    _one_line_error(lambda: check("z", entry), match)
  _one_line_error(lambda: check("z", E(kind="zeroshot"), world=False),
                  "evals.z.source='world' needs data.kind='synthetic_world'")
  check("z", E(source=""))                          # off: no kind needed
  check("z", ml_collections.ConfigDict({"kind": "retrieval", "source": "tfds:coco"}))


def test_a_kind_whose_predictor_is_missing_is_one_line_error():
  import ml_collections
  from bigvl.evaluators import build, kinds
  evals = ml_collections.ConfigDict(dict(
      retrieval=kinds.eval_config(kind="retrieval", source="jsonl:/nonexistent.jsonl"),
      off=kinds.eval_config(kind="zeroshot", source="")))
  # Checked before any data is read (the file does not exist); an entry that is off is not checked.
  msg = _one_line_error(lambda: build.build_all(evals, tokenizer=None, image_size=24,
                                                predictors=["embed_image", "generate"]),
                        r"evals.retrieval: kind 'retrieval' needs the predictor\(s\) "
                        r"\['embed_text'\], which this system does not give")
  assert "source=''" in msg
  assert build.build_all(evals, tokenizer=None, image_size=24, only=["off"],
                         predictors=[]) == {}
  assert build.missing_predictors("retrieval", evals.retrieval, ["embed_text"]) == ["embed_image"]


# Prepended to a script run in a subprocess: `Blocked(NAME)` on sys.meta_path makes `import NAME`
# (and its submodules) fail even where NAME is installed.
_BLOCK = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys

    class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
      def __init__(self, top):
        self.top = top

      def find_spec(self, name, path, target=None):
        if name.split(".")[0] == self.top:
          return importlib.machinery.ModuleSpec(name, self)

      def create_module(self, spec):
        raise ModuleNotFoundError(f"{spec.name} is blocked in this test", name=spec.name)

      def exec_module(self, module):
        pass
""")

_WORLD_SCRIPT = _BLOCK + textwrap.dedent("""
    # The evaluators must read the world's files alone.
    sys.meta_path.insert(0, Blocked("data_pipelines"))
    import numpy as np
    from bigvl.evaluators import build, kinds
    from bigvl.tokenizers import glm

    class OnePass:
      # A predictor on one process: every row at once, embeddings from pixels and token ids.
      names = ("embed_image", "embed_text")

      def run(self, name, rows, batch_size=None):
        b = rows.load(np.arange(rows.n))
        x = b["image"].reshape(rows.n, -1)[:, :8] if name == "embed_image" else b["text"][:, :8]
        return {"embedding": np.asarray(x, np.float32) + 1.0}

    world = sys.argv[1]
    evals = kinds.eval_config
    config = {"zeroshot": evals(kind="zeroshot"), "zeroshot_all": evals(classes="all"),
              "retrieval": evals(kind="retrieval", max_examples=20)}
    made = build.build_all(config, tokenizer=glm.GLMTokenizer(world + "/tokenizer.model", 24),
                           image_size=24, world_dir=world, predictors=OnePass.names)
    z, za = made["zeroshot"], made["zeroshot_all"]
    out = {"classnames": z.classnames, "templates": z.templates, "labels": z.labels.tolist(),
           "all_classes": len(za.classnames["en"]), "all_labels": za.labels.tolist(),
           "metrics": {k: v for ev in made.values() for k, v in ev.run(OnePass()).items()},
           "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "data_pipelines")}
    print("RESULT", json.dumps(out, ensure_ascii=False))
""")


def test_world_zeroshot_reads_the_world_files_without_data_pipelines(tiny_world):
  from data_pipelines import synthetic_world as w
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _WORLD_SCRIPT, tiny_world], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split("RESULT ", 1)[1])
  assert out["loaded"] == []
  # The same names, templates and labels as the generator's own.
  classes = [r["meta"]["class"] for r in _world_records(tiny_world, None)]
  split = sorted(set(classes))
  assert split == w.HELD_OUT
  assert out["classnames"] == {lang: [w.zeroshot_name(k, lang) for k in split]
                               for lang in ("en", "zh")}
  assert out["templates"] == w.ZEROSHOT_TEMPLATES
  assert out["labels"] == [split.index(k) for k in classes]
  assert out["all_classes"] == w.NUM_CLASSES and out["all_labels"] == classes
  for k in ("zeroshot/en/top1", "zeroshot/zh/top5", "zeroshot_all/en/top1", "retrieval/i2t/r1",
            "retrieval/zh/t2i/r1"):
    assert 0.0 <= out["metrics"][k] <= 1.0, k
  assert out["metrics"]["zeroshot/chance_top1"] == pytest.approx(1 / len(split))


# ---------------------------------------------------------------------------- end to end
_SCRIPT = _BLOCK + textwrap.dedent("""
    sys.meta_path.insert(0, Blocked("tensorflow"))
    sys.path.insert(0, "tests")
    from conftest import small_config
    from bigvl.evaluators import kinds
    from bigvl.train import evaluate, loop

    world, workdir, jsonl, tfds_dir, tfds_name = sys.argv[1:6]
    c = small_config(world, total_steps=2, checkpoint_every=2)
    E = kinds.eval_config
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


def _rewrite_jsonl(path, out, edit):
  lines = [json.loads(l) for l in open(path, encoding="utf-8")]
  edit(lines)
  with open(out, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  return out


def test_a_user_defined_eval_runs_in_train_and_eval_and_is_checked_when_the_run_starts(
    tiny_world, tmp_path):
  """`--config.evals.mine.source=jsonl:FILE --config.evals.mine.kind=retrieval` (a name the config
  lacks) works in train.py and eval.py; an image without a Chinese caption is left out of the zh
  figures, not an error at the end of the run; a corrupt image stops train.py before its first
  step, in one line naming the file, the line and the image."""
  from test_train import SMALL_FLAGS
  good = write_jsonl_set(tiny_world, str(tmp_path / "set"), n=6)
  good = _rewrite_jsonl(good, str(tmp_path / "set" / "good.jsonl"),
                        lambda ls: ls[0].update(caption=ls[0]["caption"][:1]))   # no zh for 0
  (tmp_path / "set" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  bad = _rewrite_jsonl(good, str(tmp_path / "set" / "bad.jsonl"),
                       lambda ls: ls[2].update(image="images/broken.jpg"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  common = ["--config=configs/m2_tiny.py", f"--config.data.dir={tiny_world}", *SMALL_FLAGS,
            "--config.batch_size=8", "--config.evals.mine.kind=retrieval",
            "--config.evals.mine.batch_size=8"]
  wd = str(tmp_path / "run")
  r = subprocess.run([sys.executable, "launch/train.py", f"--workdir={wd}", *common,
                      "--config.total_steps=2", f"--config.evals.mine.source=jsonl:{bad}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  lines = [l for l in r.stderr.splitlines() if l.startswith("train.py:")]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
  assert f"{bad}:3" in lines[0] and "broken.jpg" in lines[0], lines[0]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(wd, "checkpoints"))      # before anything was built
  shutil.rmtree(wd)
  r = subprocess.run([sys.executable, "launch/train.py", f"--workdir={wd}", *common,
                      "--config.total_steps=2", f"--config.evals.mine.source=jsonl:{good}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  final = {}
  for line in open(os.path.join(wd, "metrics.jsonl")):
    final.update(json.loads(line))
  assert {"mine/i2t/r1", "mine/zh/t2i/r1", "mine/en/i2t/r1"} <= set(final)
  r = subprocess.run([sys.executable, "launch/eval.py", f"--workdir={wd}", *common,
                      f"--config.evals.mine.source=jsonl:{good}", "--only=mine"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  evaluated = [json.loads(l) for l in open(os.path.join(wd, "eval.jsonl"))][-1]
  for k in ("mine/i2t/r1", "mine/zh/t2i/r1", "mine/en/mr"):
    assert evaluated[k] == pytest.approx(final[k], abs=1e-6), k
