"""bigvl ⇄ PyTorch: embedding parity, bit-exact round trips, checkpoint forms, refusals, CLIs."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import REPO, SHARED, small_config  # noqa: E402
from bigvl.export import name_map, params_io, torch_m2  # noqa: E402
from bigvl.models import m2_encoder  # noqa: E402
from bigvl.tokenizers import glm  # noqa: E402
from bigvl.train.checkpoint import CheckpointMismatchError  # noqa: E402

GLM_MODEL = os.path.join(SHARED, "tokenizers", "glm_chinese_sp.model")
TEXTS = {
    "en": ["a photo of a dog", "two red circles on a   white background", "A CAT."],
    "zh": ["一只狗的照片", "白色背景上的两个红色圆形", "猫"],
}
LABEL_SETS = (
    ["a photo of a dog", "a photo of a cat", "a photo of a bird"],
    ["红色的圆形", "蓝色的正方形", "绿色的三角形", "黄色的星形"],
)
# Small enough for seconds on 2 CPU cores, big enough to have every kind of weight twice.
TINY = dict(width=64, heads=4, depth=2, vl_depth=2, mlp_dim=128, out_dim=32, patch_size=8,
            image_size=32, text_positions=64)


@pytest.fixture(scope="module")
def tokenizer() -> glm.GLMTokenizer:
  if not os.path.exists(GLM_MODEL):
    pytest.skip(f"{GLM_MODEL} is not available")
  return glm.GLMTokenizer(GLM_MODEL, max_len=52)


def _cfg(variant: str, **overrides) -> m2_encoder.M2Config:
  return m2_encoder.config_for(variant, **overrides)


def _random_params(cfg: m2_encoder.M2Config, seed: int = 0) -> dict:
  """Every parameter random (LayerNorm scales around 1), so no weight goes unchecked."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    if name == "logit_scale":
      return np.float32(np.log(1 / 0.07) + 0.5 * rng.standard_normal())
    std = 0.02 if name == "embedding" else 0.05
    return (std * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params_io.abstract_params(cfg))


def _torch_cfg(cfg: m2_encoder.M2Config) -> torch_m2.M2Config:
  return torch_m2.M2Config.from_dict(params_io.model_json(cfg))


def _torch_model(cfg, params) -> torch_m2.M2Encoder:
  state = name_map.to_torch(params, depth=cfg.depth, vl_depth=cfg.vl_depth)
  return torch_m2.build(_torch_cfg(cfg), {k: torch.from_numpy(v) for k, v in state.items()})


def _bigvl_embed(cfg, params, images, ids, mask):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: m2_encoder.M2Encoder(cfg, rngs=nnx.Rngs(0))))
  with jax.default_matmul_precision("highest"):
    img = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))(params, images)
    txt = jax.jit(lambda p, i, m: nnx.merge(graphdef, p).encode_text(i, m))(params, ids, mask)
  return np.asarray(img), np.asarray(txt)


def _torch_embed(model, images, ids, mask):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    txt = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
  return img.numpy(), txt.numpy()


def _parity(cfg, tokenizer, num_images: int) -> dict[str, float]:
  """Largest differences of the image, English, Chinese and label embeddings and of the zero-shot
  probabilities (each label set against the images), bigvl against PyTorch, same random weights."""
  params = _random_params(cfg)
  model = _torch_model(cfg, params)
  images = np.random.default_rng(1).uniform(
      -1, 1, (num_images, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  groups = {**TEXTS, **{f"labels{i}": labels for i, labels in enumerate(LABEL_SETS)}}
  ids, mask = tokenizer.encode_batch([t for texts in groups.values() for t in texts])
  img_j, txt_j = _bigvl_embed(cfg, params, images, ids, mask)
  img_t, txt_t = _torch_embed(model, images, ids, mask)
  diffs = {"image": float(np.abs(img_j - img_t).max())}
  start = 0
  for name, texts in groups.items():
    rows = slice(start, start + len(texts))
    start += len(texts)
    diffs[f"text_{name}"] = float(np.abs(txt_j[rows] - txt_t[rows]).max())
    if name.startswith("labels"):
      scale = np.exp(np.float32(params["logit_scale"]))
      probs_j = np.asarray(jax.nn.softmax(scale * img_j @ txt_j[rows].T))
      with torch.no_grad():
        probs_t = model.zero_shot_probs(torch.from_numpy(img_t),
                                        torch.from_numpy(txt_t[rows])).numpy()
      diffs[f"probs_{name}"] = float(np.abs(probs_j - probs_t).max())
  print(json.dumps(diffs))
  return diffs


# ------------------------------------------------------------------ the model and the map


def test_torch_side_imports_without_jax_and_the_map_without_either():
  checks = {"bigvl.export.torch_m2": ("jax", "flax"),
            "bigvl.export.name_map": ("jax", "flax", "torch")}
  for module, banned in checks.items():
    code = f"import sys, {module}; assert not set({banned!r}) & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_torch_state_dict_is_exactly_the_released_layout():
  cfg = _cfg("tiny", **TINY, vocab_size=100)
  model = torch_m2.M2Encoder(_torch_cfg(cfg))
  keys = list(model.state_dict())
  assert sorted(keys) == sorted(name_map.torch_keys(cfg.depth, cfg.vl_depth))
  state = name_map.to_torch(_random_params(cfg), depth=cfg.depth, vl_depth=cfg.vl_depth)
  for k, v in model.state_dict().items():
    assert tuple(v.shape) == state[k].shape, k
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_released_sizes_match_the_checkpoint_count():
  # The map covers bigvl's parameters plus exactly the weights checkpoint_param_count adds back.
  cfg = _cfg("0.4B")
  with torch.device("meta"):
    model = torch_m2.M2Encoder(_torch_cfg(cfg))
  released = sum(p.numel() for p in model.parameters())
  extra = 2 * cfg.width + (cfg.width + 1) * cfg.width   # norm, pooler.dense: no embedding uses them
  assert released == m2_encoder.checkpoint_param_count(cfg) + extra


def test_tiny_embeddings_and_zero_shot_match(tokenizer):
  cfg = _cfg("tiny", **TINY, vocab_size=tokenizer.vocab_size)
  diffs = _parity(cfg, tokenizer, num_images=3)
  assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.slow
def test_0p4b_embeddings_and_zero_shot_match(tokenizer):
  cfg = _cfg("0.4B", vocab_size=tokenizer.vocab_size)
  diffs = _parity(cfg, tokenizer, num_images=2)
  assert max(diffs.values()) <= 1e-5, diffs


# ------------------------------------------------------------------ round trips


def _same_state(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def _json_doc(cfg, max_len=52):
  return {"model": params_io.model_json(cfg), "tokenizer": {"max_len": max_len, "lowercase": True}}


def test_torch_to_bigvl_to_torch_is_bit_exact(tmp_path):
  cfg = _cfg("tiny", **TINY, vocab_size=100)
  torch.manual_seed(0)
  model = torch_m2.M2Encoder(_torch_cfg(cfg))
  with torch.no_grad():   # the default init leaves LayerNorms, tokens and scalars at constants
    for p in model.parameters():
      p.normal_()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, kept = name_map.from_torch(state, depth=cfg.depth, vl_depth=cfg.vl_depth,
                                     shapes=params_io.abstract_params(cfg))
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"not read here")
  params_io.save_params(str(tmp_path / "p"), params, config_json=_json_doc(cfg),
                        tokenizer_file=str(tok), kept=kept)
  back = params_io.load_params(str(tmp_path / "p"), params_io.abstract_params(cfg))
  again = name_map.to_torch(jax.tree.map(np.asarray, back), depth=cfg.depth, vl_depth=cfg.vl_depth,
                            extras=params_io.load_kept(str(tmp_path / "p")))
  _same_state(state, again)


def test_bigvl_to_torch_to_bigvl_is_bit_exact():
  cfg = _cfg("tiny", **TINY, vocab_size=100)
  params = _random_params(cfg, seed=3)
  state = name_map.to_torch(params, depth=cfg.depth, vl_depth=cfg.vl_depth)
  # The file is the one place the torch side changes the layout; go through it.
  import safetensors.numpy
  state = safetensors.numpy.load(safetensors.numpy.save(state))
  back, kept = name_map.from_torch(state, depth=cfg.depth, vl_depth=cfg.vl_depth,
                                   shapes=params_io.abstract_params(cfg))
  _same_state({name_map.path_str(p): v for p, v in name_map.flatten(params).items()},
              {name_map.path_str(p): v for p, v in name_map.flatten(back).items()})
  # The top-stack B branch that bigvl lacks is written as a copy of A.
  assert np.array_equal(kept["backbone_vl.layers.1.ffn.B.fc2.weight"],
                        state["backbone_vl.layers.1.ffn.A.fc2.weight"])


# ------------------------------------------------------------------ checkpoint files


@pytest.fixture(scope="module")
def small_state() -> dict:
  cfg = _cfg("tiny", **TINY, vocab_size=100)
  state = name_map.to_torch(_random_params(cfg, seed=5), depth=cfg.depth, vl_depth=cfg.vl_depth)
  return {k: torch.from_numpy(v) for k, v in state.items()}


def _forms(state):
  prefixed = {torch_m2.DEEPSPEED_PREFIX + k: v for k, v in state.items()}
  lightning = dict(state, **{"visual_tokenizer.encoder.proj.weight": torch.zeros(2, 2)})
  return {
      "raw.pt": state,
      "lightning.ckpt": {"state_dict": lightning, "epoch": 3, "global_step": 1000},
      "deepspeed.pt": {"module": prefixed},
      "model.pth": {"model": state},
      "prefixed.ckpt": prefixed,
  }


@pytest.mark.parametrize("name", ["raw.pt", "lightning.ckpt", "deepspeed.pt", "model.pth",
                                  "prefixed.ckpt", "flat.safetensors"])
def test_every_checkpoint_form_imports(small_state, tmp_path, name):
  path = str(tmp_path / name)
  if name.endswith(".safetensors"):
    import safetensors.torch
    safetensors.torch.save_file(small_state, path)
  else:
    torch.save(_forms(small_state)[name], path)
  got = {k: v for k, v in torch_m2.read_state_dict(path).items()
         if not k.startswith(name_map.DROPPED_PREFIXES)}
  assert sorted(got) == sorted(small_state)
  assert all(torch.equal(got[k], small_state[k]) for k in got)
  name_map.from_torch({k: v.numpy() for k, v in got.items()}, depth=2, vl_depth=2)


def _import(state, **overrides):
  cfg = _cfg("tiny", **{**TINY, "vocab_size": 100, **overrides})
  return name_map.from_torch({k: v.numpy() for k, v in state.items()}, depth=cfg.depth,
                             vl_depth=cfg.vl_depth, shapes=params_io.abstract_params(cfg))


def test_wrong_shape_missing_and_unexpected_keys_are_named(small_state):
  bad = dict(small_state)
  bad["backbone.encoder.layers.1.ffn.B.fc1.weight"] = torch.zeros(3, 64)
  with pytest.raises(name_map.ConversionError, match=r"layers\.1\.ffn\.B\.fc1\.weight.*\(3, 64\)"):
    _import(bad)
  with pytest.raises(name_map.ConversionError, match=r"text_embed\.weight.*\(100, 64\)"):
    _import(small_state, vocab_size=101)
  missing = {k: v for k, v in small_state.items() if k != "backbone_vl.layer_norm.B.bias"}
  with pytest.raises(name_map.ConversionError, match=r"missing.*backbone_vl\.layer_norm\.B\.bias"):
    _import(missing)
  extra = dict(small_state, **{"backbone.encoder.output_projection.weight": torch.zeros(1)})
  with pytest.raises(name_map.ConversionError, match="unexpected.*output_projection"):
    _import(extra)
  kept_bad = dict(small_state, **{"pooler.dense.bias": torch.zeros(5)})
  with pytest.raises(name_map.ConversionError, match="pooler.dense.bias"):
    _import(kept_bad)


class _RunsCode:
  """Unpickling this would create a file: a stand-in for any code a pickle can carry."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_a_pickle_carrying_code_is_refused(small_state, tmp_path):
  marker = tmp_path / "ran"
  path = str(tmp_path / "evil.ckpt")
  torch.save({"state_dict": dict(small_state), "hook": _RunsCode(str(marker))}, path)
  with pytest.raises(torch_m2.UnsafeCheckpointError, match="refused"):
    torch_m2.read_state_dict(path)
  legacy = str(tmp_path / "evil_legacy.pt")
  with open(legacy, "wb") as f:
    pickle.dump({"x": _RunsCode(str(marker))}, f)
  with pytest.raises(torch_m2.UnsafeCheckpointError):
    torch_m2.read_state_dict(legacy)
  assert not marker.exists()


def test_vision_positions_resize_like_the_reference():
  table = torch.arange(3 + 36, dtype=torch.float32)[:, None].repeat(1, 2) * torch.tensor([1., -1.])
  out = torch_m2.resize_vision_positions(table, 3 + 9)
  assert out.shape == (12, 2)
  assert torch.equal(out[:3], table[:3])
  grid = table[3:, 0].numpy().reshape(6, 6)
  want = grid.reshape(3, 2, 3, 2).mean(axis=(1, 3)).reshape(-1)   # area = mean of 2x2 blocks
  np.testing.assert_allclose(out[3:, 0].numpy(), want)
  np.testing.assert_allclose(out[3:, 1].numpy(), -want)
  assert torch_m2.resize_vision_positions(table, 39) is table
  with pytest.raises(ValueError, match="square"):
    torch_m2.resize_vision_positions(table, 3 + 10)


# ------------------------------------------------------------------ the command lines


def _run(args, **kw):
  p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                     timeout=600, **kw)
  assert p.returncode == 0, p.stderr[-3000:]
  return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]


def _small_sizes(world) -> dict:
  """The model sizes conftest's small_config sets (its vocabulary is the world's tokenizer)."""
  model = small_config(world).model
  runtime = ("variant", "dtype", "remat", "eval_dtype")
  return {k: v for k, v in model.items() if v is not None and k not in runtime}


def _small_flags(world) -> list[str]:
  """Command-line overrides that turn configs/m2_tiny.py into conftest's small_config."""
  c = small_config(world)
  flags = [f"--config.data.dir={world}", f"--config.tokenizer.max_len={c.tokenizer.max_len}"]
  flags += [f"--config.data.world.{k}={v}" for k, v in c.data.world.items()]
  return flags + [f"--config.model.{k}={v}" for k, v in _small_sizes(world).items()]


# slow: a training and three CLIs; the bit-exact round trips and the README eval commands run by default
@pytest.mark.slow
def test_export_check_import_and_export_again(tiny_world, tmp_path):
  from bigvl.train import loop
  wd = str(tmp_path / "run")
  loop.train(small_config(tiny_world, total_steps=2), wd)
  out = str(tmp_path / "torch")
  _, check = _run(["launch/export_torch.py", f"--workdir={wd}", f"--out={out}", "--check"])
  assert check["max_abs_diff"] <= 1e-5 and check["probs_max_abs_diff"] <= 1e-5, check
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
  assert json.load(open(os.path.join(out, "config.json")))["source"]["step"] == 2

  imported = str(tmp_path / "bigvl")
  _run(["launch/import_torch.py", f"--ckpt={out}/model.safetensors", "--config=configs/m2_tiny.py",
        f"--out={imported}", *_small_flags(tiny_world)])
  cfg = _cfg("tiny", **_small_sizes(tiny_world), vocab_size=384)
  trained = params_io.load_params(wd, params_io.abstract_params(cfg))
  back = params_io.load_params(imported, params_io.abstract_params(cfg))
  assert jax.tree.all(jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                                   trained, back))
  again = str(tmp_path / "torch2")
  _run(["launch/export_torch.py", f"--workdir={imported}", f"--out={again}"])
  with open(f"{out}/model.safetensors", "rb") as a, open(f"{again}/model.safetensors", "rb") as b:
    assert a.read() == b.read()


def test_import_refuses_a_mismatched_checkpoint(tiny_world, tmp_path):
  cfg = _cfg("tiny", **_small_sizes(tiny_world), vocab_size=383)
  state = name_map.to_torch(_random_params(cfg), depth=cfg.depth, vl_depth=cfg.vl_depth)
  path = str(tmp_path / "other.pt")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  p = subprocess.run([sys.executable, "launch/import_torch.py", f"--ckpt={path}",
                      "--config=configs/m2_tiny.py", f"--out={tmp_path / 'x'}",
                      *_small_flags(tiny_world)],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode != 0
  assert "'backbone.text_embed.weight' has shape (383, 32)" in p.stderr, p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "x")


def test_import_resizes_the_vision_positions_of_another_image_size(tiny_world, tmp_path):
  sizes = _small_sizes(tiny_world)                     # 24 px images of 8 px patches: 3x3
  cfg = _cfg("tiny", **{**sizes, "image_size": 48}, vocab_size=384)    # 6x6 patches
  state = name_map.to_torch(_random_params(cfg), depth=cfg.depth, vl_depth=cfg.vl_depth)
  path = str(tmp_path / "big.pt")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  out = str(tmp_path / "x")
  (summary,) = _run(["launch/import_torch.py", f"--ckpt={path}", "--config=configs/m2_tiny.py",
                     f"--out={out}", *_small_flags(tiny_world)])
  assert summary["resized_vision_positions"] == [39, 12]
  table = params_io.load_params(out)["backbone"]["encoder"]["embed_positions"]["A"]["embedding"]
  want = torch_m2.resize_vision_positions(
      torch.from_numpy(state[torch_m2.VISION_POSITIONS_KEY]), 12).numpy()
  np.testing.assert_array_equal(table, want)


def test_load_params_names_a_mismatched_parameter(tmp_path):
  cfg = _cfg("tiny", **TINY, vocab_size=100)
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"not read here")
  params_io.save_params(str(tmp_path / "p"), _random_params(cfg), config_json=_json_doc(cfg),
                        tokenizer_file=str(tok))
  other = _cfg("tiny", **{**TINY, "out_dim": 16}, vocab_size=100)
  with pytest.raises(CheckpointMismatchError, match=r"itc_vl_image_proj/fc/kernel.*\(64, 32\)"):
    params_io.load_params(str(tmp_path / "p"), params_io.abstract_params(other))
  with pytest.raises(ValueError, match="no steps"):
    params_io.load_params(str(tmp_path / "p"), step=3)
  with pytest.raises(FileNotFoundError, match="neither"):
    params_io.load_params(str(tmp_path))


def _readme_commands(prefix: str) -> list[str]:
  """The README's commands that start with `prefix`, as written there (inside backticks)."""
  import re
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  return [m for m in re.findall(r"`(python [^`]+)`", text) if m.startswith(prefix)]


def test_the_readmes_evaluation_commands_run_verbatim_on_an_imported_checkpoint(tiny_world,
                                                                                 tmp_path):
  """A tiny released-format checkpoint imported as the import docstring shows, then the README's
  `launch/eval.py --config=configs/m2_0p4b.py --checkpoint=IMPORTED ...` lines run with only their
  placeholders filled in (DIR, IMPORTED, the data paths): no training shards, no tokenizer.path
  (the imported directory's own serves), the model sized from the directory, float32."""
  import shlex
  import safetensors.torch
  from test_eval_data import build_tfds_set, write_jsonl_set
  from data_pipelines import synthetic_world
  sizes = _small_sizes(tiny_world)
  cfg = _cfg("tiny", **sizes, vocab_size=384)
  state = name_map.to_torch(_random_params(cfg, seed=3), depth=cfg.depth, vl_depth=cfg.vl_depth)
  ckpt = str(tmp_path / "m2_encoder_tiny.safetensors")
  safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in state.items()}, ckpt)
  imported = str(tmp_path / "imported")
  tok = os.path.join(tiny_world, "tokenizer.model")
  _run(["launch/import_torch.py", f"--ckpt={ckpt}", "--config=configs/m2_0p4b.py",
        f"--config.tokenizer.path={tok}", f"--out={imported}",
        f"--config.tokenizer.max_len={small_config(tiny_world).tokenizer.max_len}",
        *[f"--config.model.{k}={v}" for k, v in sizes.items()]])
  jsonl = write_jsonl_set(tiny_world, str(tmp_path / "f30k"), n=8)
  tfds_dir = str(tmp_path / "tfds")
  tfds_name = build_tfds_set(tiny_world, tfds_dir, n=8, split="validation")
  classes = tmp_path / "imagenet_en.txt"
  classes.write_text("\n".join(c["en"] for c in synthetic_world.CLASSES))
  fill = {"DIR": str(tmp_path / "evals"), "IMPORTED": imported,
          "/data/f30k-cn_test.jsonl": jsonl, "tfds:imagenet2012": f"tfds:{tfds_name}",
          "/data/tfds": tfds_dir, "en:imagenet_en.txt": f"en:{classes}"}
  commands = _readme_commands("python launch/eval.py --config=configs/m2_0p4b.py")
  assert len(commands) == 2, commands
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  for command in commands:
    args = shlex.split(command)[1:]
    for old, new in fill.items():
      args = [a.replace(old, new) if old not in ("DIR", "IMPORTED") else
              re.sub(rf"=({old})\b", f"={new}", a) for a in args]
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (args, p.stderr[-3000:])
  rows = [json.loads(l) for l in open(os.path.join(fill["DIR"], "eval.jsonl"))]
  ret, zs = rows
  assert 0 <= ret["flickr30k_cn/i2t/r1"] <= 1 and 0 <= ret["flickr30k_cn/zh/t2i/r1"] <= 1
  assert 0 <= zs["imagenet/en/top1"] <= 1 and "imagenet/chance_top1" in zs
  assert ret["checkpoint"] == zs["checkpoint"] == imported
