"""DMAE on the system protocol: the loss (ring similarity, NegNCE, TPM-CL) sharded on 8 fake devices
equals the 1-device one, with no all-gather of token features in the step; and an MSR-VTT-layout
folder of MP4 files converts, trains a few steps and evaluates through `video_retrieval`."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigvl import systems
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import config_lib

OUT_DIM = 24


def _config(**overrides):
  c = config_lib.full_config("dmae")
  c.model.update(dict(width=32, heads=2, depth=1, vl_depth=1, mlp_dim=64, out_dim=OUT_DIM,
                      patch_size=8, image_size=16, text_positions=64, init_std=0.2))
  c.model.temporal_depth, c.model.temporal_heads = 1, 2
  c.data.num_frames = 4
  c.tokenizer.max_len = 12
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 16, 3, 3, 1
  c.optim.warmup_steps = 1
  return config_lib.set_dotted(config_lib.finalize(c), overrides)


def _loss_and_grads(n: int, config):
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = mesh_lib.make_mesh({"data": n}, jax.devices()[:n])
  system = systems.build(config, mesh, mesh_lib.DEFAULT_RULES)
  model = system.make_model(nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = system.fake_batch(config.batch_size, seed=1)
  sharding = NamedSharding(mesh, P("data"))
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}

  def f(p, b):
    return jax.value_and_grad(lambda q: system.loss(nnx.merge(graphdef, q), b,
                                                    jax.random.key(0)), has_aux=True)(p)
  step = jax.jit(f)
  with jax.set_mesh(mesh):
    (loss, aux), grads = step(params, batch)
    hlo = step.lower(params, batch).compile().as_text()
  return float(loss), aux, grads, hlo


@pytest.mark.parametrize("kind,partial", [("negnce", 4), ("infonce", 0)])
def test_sharded_loss_equals_one_device_and_gathers_no_features(kind, partial):
  config = _config(**{"loss.kind": kind, "loss.partial_type": partial})
  loss1, aux1, g1, _ = _loss_and_grads(1, config)
  loss8, aux8, g8, hlo = _loss_and_grads(8, config)
  assert math.isfinite(loss1) and abs(loss1 - loss8) <= 1e-5, (loss1, loss8)
  for k in aux1:
    assert abs(float(aux1[k]) - float(aux8[k])) <= 1e-5, k
  # Gradients: float32 sums in another order, amplified by the logit scale (100), and argmax picks
  # of the visual cue that may flip on near-ties: within 1e-2 of each leaf's largest entry.
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max() + 1e-6
  gathers = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)]
  # Token and frame features end in OUT_DIM: none is gathered (the ring permutes them).
  assert not [g for g in gathers if re.search(rf",{OUT_DIM}\]", g)], gathers
  assert "collective-permute" in hlo


@pytest.mark.parametrize("scale", [100.0, 0.0])
def test_tpm_margins_weigh_by_the_logit_scale(scale):
  """loss = NegNCE + tpm_weight · (scale / 100 with tpm_relative) · margins: the authors' sum at
  their fixed scale of 100, and the same gradient ratio under a learned scale."""
  rel = _loss_and_grads(1, _config(**{"loss.scale": scale}))[:2]
  plain = _loss_and_grads(1, _config(**{"loss.scale": scale, "loss.tpm_relative": False,
                                        "loss.tpm_weight": 0.5}))[:2]
  s = float(rel[1]["logit_scale"])
  assert s == pytest.approx(100.0 if scale else 1 / 0.07, rel=1e-5)
  assert float(rel[1]["tpm/weight"]) == pytest.approx(s / 100.0, rel=1e-6)
  assert float(plain[1]["tpm/weight"]) == 0.5
  for (loss, aux), w in ((rel, s / 100.0), (plain, 0.5)):
    assert float(aux["loss_tpm"]) > 0
    assert loss == pytest.approx(
        float(aux["loss_negnce"]) + w * float(aux["loss_tpm"]), rel=1e-5)


def test_msrvtt_layout_converts_trains_and_evaluates(tiny_world, tmp_path):
  pytest.importorskip("av")
  from test_video_data import make_mp4
  from bigvl.train import loop
  from data_pipelines import video_to_shards
  root = tmp_path / "MSRVTT"
  (root / "videos" / "all").mkdir(parents=True)
  words = ["red", "blue", "green", "white", "pink", "cyan", "brown", "orange", "purple", "grey"]
  for k in range(10):
    make_mp4(root / "videos" / "all" / f"video{k}.mp4", num_frames=12, colour=40 + 20 * k)
  sentences = [{"video_id": f"video{k}", "caption": f"a {w} bar moves", "sen_id": 2 * k}
               for k, w in enumerate(words)]
  sentences += [{"video_id": f"video{k}", "caption": f"一个{w}", "sen_id": 2 * k + 1}
                for k, w in enumerate(words)]
  (root / "train_val_videodatainfo.json").write_text(json.dumps({
      "videos": [{"video_id": f"video{k}", "split": "train"} for k in range(6)],
      "sentences": [s for s in sentences if int(s["video_id"][5:]) < 6]}))
  (root / "test_videodatainfo.json").write_text(json.dumps({
      "videos": [{"video_id": f"video{k}", "split": "test"} for k in range(6, 10)],
      "sentences": [s for s in sentences if int(s["video_id"][5:]) >= 6]}, ensure_ascii=False))
  shards = tmp_path / "shards"
  summary = video_to_shards.convert(root / "train_val_videodatainfo.json", shards,
                                    input_format="msrvtt", msrvtt_split="train", frames=4,
                                    frame_size=16, num_workers=1)
  assert summary["written"] == 6 and summary["skipped"] == 0
  c = _config(**{"data.kind": "shards", "data.train_files": str(shards / "train-*.array_record"),
                 "tokenizer.path": f"{tiny_world}/tokenizer.model", "batch_size": 8,
                 "evals.video_retrieval.source": f"msrvtt:{root / 'test_videodatainfo.json'}",
                 "evals.video_retrieval.split": "test", "evals.video_retrieval.tile": 4})
  out = loop.train(c, str(tmp_path / "wd"))
  assert out["video_retrieval/chance/t2v/r1"] == pytest.approx(1 / 4)
  assert out["video_retrieval/chance/v2t/r1"] == pytest.approx(1 / 4)  # 2 of 8 sentences each
  for d in ("t2v", "v2t"):
    for k in ("r1", "r5", "r10", "mdr", "mnr"):
      assert math.isfinite(out[f"video_retrieval/{d}/{k}"])
    assert 1 <= out[f"video_retrieval/{d}/mdr"] <= 4
  assert {"video_retrieval/en/t2v/r1", "video_retrieval/zh/t2v/r1"} <= set(out)


def _demo(tmp_path, name, *overrides):
  import os
  import subprocess
  import sys
  from conftest import REPO
  wd = tmp_path / name
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/train.py"),
                      "--config=configs/dmae_tiny.py", f"--workdir={wd}", *overrides], cwd=REPO,
                     capture_output=True, text=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if "video_retrieval/t2v/r1" in row][-1]


@pytest.mark.slow
def test_the_demo_reaches_its_bars_and_beats_a_single_frame_model(tmp_path):
  """configs/dmae_tiny.py as the README runs it: on the world's held-out compositions (clips in
  time-mirrored pairs) R@1 both ways at least 10 × chance, and above the same run with the frames
  mean-pooled (no temporal mixing), which cannot tell a clip from its mirror."""
  full = _demo(tmp_path, "full")
  single = _demo(tmp_path, "single", "--config.model.temporal=mean")
  for d in ("t2v", "v2t"):
    assert full[f"video_retrieval/{d}/r1"] >= 10 * full[f"video_retrieval/chance/{d}/r1"]
    assert full[f"video_retrieval/{d}/r1"] > single[f"video_retrieval/{d}/r1"]


def test_init_from_an_m2_run_loads_every_tower_weight(m2_backbone, tmp_path):
  """DMAE from an M²-Encoder run (`init_from`): the run's towers fill the video-text model's
  towers, its sizes and tokenizer are adopted, and only the temporal mixer and TPM-CL's weight
  predictors start at init."""
  from bigvl.train import loop
  c = config_lib.full_config("dmae")
  c.init_from = m2_backbone
  c.data.dir = str(tmp_path / "videos")
  c.data.world.update(dict(num_train=64, num_eval=16, num_shards=1))
  c.data.num_frames, c.model.temporal_depth = 4, 1
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 16, 1, 1, 1
  c.optim.warmup_steps = 1
  c.evals.video_retrieval.tile = 8
  out = loop.train(config_lib.finalize(c), str(tmp_path / "wd"))
  report = json.loads((tmp_path / "wd" / "init_from.json").read_text())
  assert report["loaded"] and all(k.startswith("towers/") for k in report["loaded"])
  assert report["left_at_init"]
  assert not [k for k in report["left_at_init"] if k.startswith("towers/")]
  assert math.isfinite(out["video_retrieval/t2v/r1"])
