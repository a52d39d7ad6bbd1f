"""SNP-S3: the MSSM masker (only significant words, 80/10/10), significant-word mining and its CLI,
the masked-LM head's input (masked, unlike the authors' text-only head), bit-identical resume with
the MoCo queues and momentum encoder, QA fine-tuning from pretraining, the sharded loss, and the
MSRVTT-QA / MC JSON sources."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigvl import systems
from bigvl.data import significant
from bigvl.losses import mlm
from bigvl.parallel import mesh as mesh_lib
from bigvl.train import config_lib
from conftest import REPO


# --------------------------------------------------------------------------- the masker


def test_mssm_masks_only_significant_tokens_and_keeps_80_10_10():
  rng = np.random.default_rng(0)
  b, n, vocab = 4000, 24, 50
  lengths = rng.integers(6, n + 1, b)
  real = np.arange(n)[None] < lengths[:, None]
  ids = np.where(real, rng.integers(3, vocab, (b, n)), 1).astype(np.int32)
  cands = real & (rng.random((b, n)) < 0.4)
  variants = np.zeros((vocab, 4), np.int32)
  counts = np.zeros((vocab,), np.int32)
  variants[3:20, :2] = [[40, 41]]                 # ids 3..19 have two variants, the rest none
  counts[3:20] = 2
  fallback = np.asarray([45, 46, 47], np.int32)
  out = jax.jit(lambda key: mlm.mask_tokens(
      key, jnp.asarray(ids), jnp.asarray(real), jnp.asarray(cands), mask_id=2, ratio=0.15,
      variants=jnp.asarray(variants), variant_counts=jnp.asarray(counts),
      fallback=jnp.asarray(fallback)))(jax.random.key(0))
  sel, act, new = (np.asarray(out[k]) for k in ("selected", "action", "ids"))
  assert not (sel & ~cands).any()                          # only ever significant tokens
  want = np.minimum(np.maximum(np.round(0.15 * real.sum(1)), 1), cands.sum(1))
  np.testing.assert_array_equal(sel.sum(1), want)          # ~15% of the tokens, when there are
  np.testing.assert_array_equal(new[~sel], ids[~sel])      # everything else untouched
  np.testing.assert_array_equal(np.asarray(out["targets"]), ids)
  total = sel.sum()
  for action, p in ((mlm.MASK, 0.8), (mlm.VARIANT, 0.1), (mlm.KEEP, 0.1)):
    share = (act[sel] == action).mean()
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / total), (action, share)
  assert (new[sel & (act == mlm.MASK)] == 2).all()
  assert (new[sel & (act == mlm.KEEP)] == ids[sel & (act == mlm.KEEP)]).all()
  var = sel & (act == mlm.VARIANT)
  has = counts[ids] > 0
  assert np.isin(new[var & has], [40, 41]).all() and np.isin(new[var & ~has], fallback).all()


def test_plain_mlm_candidates_are_every_word_and_a_row_without_any_is_left_alone():
  ids = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 1, 1, 1, 1, 1, 1, 1]])
  real = ids != 1
  none = jnp.zeros_like(real).at[0].set(real[0])           # row 1: no candidate
  out = mlm.mask_tokens(jax.random.key(3), ids, real, none, mask_id=2, ratio=0.3,
                        variants=jnp.zeros((20, 1), jnp.int32),
                        variant_counts=jnp.zeros((20,), jnp.int32),
                        fallback=jnp.arange(5, 15, dtype=jnp.int32))
  assert int(out["selected"][0].sum()) == 3 and int(out["selected"][1].sum()) == 0
  np.testing.assert_array_equal(np.asarray(out["ids"][1]), np.asarray(ids[1]))


# --------------------------------------------------------------------------- significant words


def test_mining_keeps_content_words_and_drops_numbers_be_and_single_characters():
  caps = ["The red circle is moving left", "a red square moves 3 times", "红色圆形是向左移动的",
          "x marks it"]
  words = dict(significant.mine(caps, top=100))
  assert words["red"] == 2 and "circle" in words and "moves" in words and "红色" in words
  for gone in ("the", "is", "3", "a", "x", "是", "it"):
    assert gone not in words
  assert list(dict(significant.mine(caps, top=2))) == ["red", "circle"]   # by count, then word
  assert significant.lemma("moves") == significant.lemma("moving") == significant.lemma("move")


def test_world_default_covers_its_vocabulary(tmp_path):
  words, groups = significant.world_words(num_clips=300)
  found = {w for w, _ in words}
  for w in ("red", "blue", "circle", "square", "moves", "appears", "left", "红色", "圆形", "移动"):
    assert w in found, w
  assert not found & {"the", "a", "then", "and", "is", "一个", "然后"}
  assert groups["red"] == groups["blue"] == "class:colour"
  path = str(tmp_path / "w.tsv")
  significant.write(path, words, groups)
  assert significant.read(path) == groups
  (tmp_path / "bad.tsv").write_text("red\t3\n")
  with pytest.raises(ValueError, match=r"bad.tsv:1"):
    significant.read(str(tmp_path / "bad.tsv"))


def test_significant_words_cli(tmp_path):
  src = tmp_path / "caps.jsonl"
  src.write_text("\n".join(json.dumps({"caption": c}) for c in
                           [["a red circle appears", "一个红色圆形出现了"], "the red square moves"]))
  out = tmp_path / "words.tsv"
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch/significant_words.py"),
                      f"--input={src}", "--top=4", f"--out={out}"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report["captions"] == 3 and report["words"] == 4 and report["top_words"][0] == "red"
  assert list(significant.read(str(out)))[0] == "red"
  bad = subprocess.run([sys.executable, os.path.join(REPO, "launch/significant_words.py"),
                        f"--input={tmp_path / 'none.txt'}", f"--out={out}"], capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and "none.txt" in bad.stderr and len(bad.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- the system

@pytest.fixture(scope="module")
def video_world(tmp_path_factory):
  from data_pipelines import build_videos
  d = str(tmp_path_factory.mktemp("snp_videos"))
  build_videos.build(d, frame_size=16, num_frames=4, num_train=48, num_eval=16, num_shards=1,
                     num_corpus_clips=600)
  return d


def _config(world: str, task: str = "pretrain", **overrides):
  c = config_lib.full_config("snp_s3")
  c.task = task
  c.model.update(dict(width=32, depth=1, heads=2, mlp_dim=64, embed_dim=16, frame_size=16,
                      patch_size=8, vit_width=32, vit_depth=1, vit_heads=2, clip_groups=2))
  c.data.dir, c.data.num_frames = world, 4
  c.data.world.update(dict(num_train=48, num_eval=16, num_shards=1))
  c.tokenizer.max_len = 24
  c.loss.queue_size, c.loss.momentum = 40, 0.9
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 8, 4, 2, 1
  c.optim.warmup_steps = 1
  c.evals.video_retrieval.batch_size = c.evals.video_qa.batch_size = 16
  return config_lib.set_dotted(config_lib.finalize(c), overrides)


def _system(config, n: int = 1):
  mesh = mesh_lib.make_mesh({"data": n}, jax.devices()[:n])
  system = systems.build(config, mesh, mesh_lib.DEFAULT_RULES)
  system.prepare(None)
  return system, mesh


def test_the_mlm_head_sees_the_masked_input(video_world):
  """The authors' text-only MLM head reads the unmasked caption; here the head's logits are a
  function of the masked input alone: changing the original token under a [MASK] changes nothing
  the head sees (it would, were the head fed the caption)."""
  config = _config(video_world)
  system, _ = _system(config)
  model = system.make_model(nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in system.fake_batch(8, seed=2).items()}
  key = jax.random.key(5)
  logits, m = system.mlm_outputs(model, batch, key)
  masked = np.asarray(m["selected"]) & (np.asarray(m["action"]) == mlm.MASK)
  assert masked.any()
  other = dict(batch, text=jnp.where(jnp.asarray(masked), (batch["text"] + 7) % 200, batch["text"]))
  logits2, m2 = system.mlm_outputs(model, other, key)
  np.testing.assert_array_equal(np.asarray(m2["ids"]), np.asarray(m["ids"]))
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), rtol=0, atol=0)
  # ... while the unmasked caption through the same encoder gives other logits at those places.
  vis, vmask = model.visual_tokens(batch["frames"], batch["frame_mask"])
  plain = model.mlm_logits(model.cross(batch["text"], batch["text_mask"], vis, vmask,
                                       system.tokenizer.eos_id)[:, :batch["text"].shape[1]])
  assert np.abs(np.asarray(plain)[masked] - np.asarray(logits)[masked]).max() > 1e-4


def test_pretraining_resumes_bit_identical_with_queues_and_momentum(video_world, tmp_path):
  """Stopped at step 2 of 4 and resumed: the same bytes as the straight run, parameters and the
  extra state (momentum copy, both queues and their pointers: the digest covers them)."""
  from bigvl.train import loop
  off = {"evals.video_retrieval.source": "", "evals.video_qa.source": ""}
  straight = loop.train(_config(video_world, **off), str(tmp_path / "a"))
  wd = str(tmp_path / "b")
  loop.train(_config(video_world, **off), wd, stop_at=2)
  resumed = loop.train(_config(video_world, **off), wd)
  assert resumed["params_sha256"] == straight["params_sha256"]
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  negs = [r["train/queue_negatives"] for r in rows if "train/queue_negatives" in r]
  assert negs == [0, 8, 16, 24]            # each step reads the queue, then adds its 8 keys
  for key in ("train/loss_mlm", "train/loss_lvwm", "train/loss_itc", "train/loss_itm"):
    assert all(math.isfinite(r[key]) for r in rows if key in r)


def test_the_digest_covers_the_extra_state(video_world):
  """Two extra states that differ only in the queue give other digests (so the resume test above
  compares them too)."""
  from bigvl.train import loop
  params = {"w": jnp.ones((2,))}
  a = loop.params_sha256(params, {"queue_t": {"queue": jnp.zeros((3, 2))}})
  b = loop.params_sha256(params, {"queue_t": {"queue": jnp.zeros((3, 2)).at[1, 0].set(1.0)}})
  assert a != b and a != loop.params_sha256(params)


def test_qa_finetunes_from_pretraining(video_world, tmp_path):
  from bigvl.train import loop
  pre = str(tmp_path / "pre")
  loop.train(_config(video_world, **{"total_steps": 1, "evals.video_retrieval.source": "",
                                     "evals.video_qa.source": ""}), pre)
  out = loop.train(_config(video_world, "qa", init_from=pre, total_steps=2), str(tmp_path / "qa"))
  report = json.loads((tmp_path / "qa" / "init_from.json").read_text())
  assert sorted(report["left_at_init"]) == ["qa_open/bias", "qa_open/kernel"]
  for k in ("video_qa/mc/acc", "video_qa/mc/chance", "video_qa/open/acc", "video_qa/open/chance"):
    assert 0 <= out[k] <= 1, k
  assert 0.25 <= out["video_qa/mc/chance"] < 0.5


def test_sharded_pretraining_loss_equals_one_device(video_world):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  config = _config(video_world, batch_size=16, **{"loss.queue_size": 48})
  results = []
  for n in (1, 8):
    system, mesh = _system(config, n)
    model = system.make_model(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    extra = system.init_extra(params)
    extra["queue_t"] = extra["queue_t"] | {"queue": jnp.asarray(np.random.default_rng(1).normal(
        size=extra["queue_t"]["queue"].shape), jnp.float32), "count": jnp.int32(20),
        "ptr": jnp.int32(20)}
    batch = system.fake_batch(16, seed=3)
    sharding = NamedSharding(mesh, P("data"))
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    step = jax.jit(lambda p, e, b: system.value_and_grad_with_extra(graphdef, p, nnx.State({}), e,
                                                                    b, jax.random.key(0)))
    with jax.set_mesh(mesh):
      (loss, aux), grads, new_extra = step(params, extra, batch)
    results.append((float(loss), {k: float(v) for k, v in aux.items()},
                    np.asarray(new_extra["queue_v"]["queue"])))
  (l1, a1, q1), (l8, a8, q8) = results
  assert abs(l1 - l8) <= 1e-5 * max(1.0, abs(l1)), (l1, l8)
  for k in a1:
    assert abs(a1[k] - a8[k]) <= 1e-4 * max(1.0, abs(a1[k])), k
  np.testing.assert_allclose(q1, q8, atol=1e-6)


def test_msrvtt_qa_and_mc_json_load_and_evaluate(video_world, tmp_path):
  pytest.importorskip("av")
  from test_video_data import make_mp4
  from bigvl.train import loop
  videos = tmp_path / "videos"
  videos.mkdir()
  for k in range(3):
    make_mp4(videos / f"video{7010 + k}.mp4", num_frames=8, colour=60 + 60 * k)
  qa = [{"video_id": 7010, "question": "what moves?", "answer": "bar", "id": 0},
        {"video_id": "video7011", "question": "what colour?", "answer": "grey", "id": 1},
        {"video_id": 7012, "question": "what is it?", "answer": "unheard-of", "id": 2}]
  mc = [{"clip_name": "video7010", "options": ["a bar moves", "a cat", "a dog", "rain", "snow"],
         "answer": 0},
        {"video_id": "video7012", "options": ["x", "a grey bar moves", "y", "z", "w"],
         "answer": 1}]
  (tmp_path / "qa.json").write_text(json.dumps(qa))
  (tmp_path / "mc.json").write_text(json.dumps(mc))
  (tmp_path / "answers.txt").write_text("bar\ngrey\nred\n")
  config = _config(video_world, "qa", total_steps=1)
  with config.unlocked():
    config.qa.answers = str(tmp_path / "answers.txt")
    from bigvl.evaluators import kinds
    config.evals.video_qa.source = f"msrvtt_qa:{tmp_path / 'qa.json'}"
    config.evals.video_qa.video_dir = str(videos)
    config.evals.video_qa_mc = kinds.eval_config(kind="video_qa", source=f"msrvtt_mc:"
                                                 f"{tmp_path / 'mc.json'}", video_dir=str(videos),
                                                 batch_size=16, choices=5)
    config.evals.video_retrieval.source = ""
    config.data.qa_choices = 5
  out = loop.train(config, str(tmp_path / "run"))
  assert out["video_qa/open/n"] == 3 and 0 <= out["video_qa/open/acc"] <= 2 / 3
  assert out["video_qa/open/chance"] == pytest.approx(1 / 3)
  assert out["video_qa_mc/mc/n"] == 2 and out["video_qa_mc/mc/chance"] == pytest.approx(0.2)
  # A malformed item is one error that names the file and the item.
  (tmp_path / "bad.json").write_text(json.dumps([{"video_id": 7010, "options": ["a"],
                                                  "answer": 3}]))
  from bigvl.evaluators import video_qa
  with pytest.raises(ValueError, match=r"bad.json: item 0"):
    video_qa.json_set("msrvtt_mc", str(tmp_path / "bad.json"), str(videos), 4, 16)


def test_patch_tokens_are_each_groups_pooled_vit_patches():
  """model.patch_grid=g adds C·g² visual tokens: each frame group's ViT patch tokens averaged over
  its real frames and pooled to g×g, after the C group tokens; the contrastive video embedding
  reads the group tokens only."""
  from bigvl.models import snp_s3 as snp_model
  cfg = snp_model.SNPS3Config(vocab_size=50, max_len=8, width=16, depth=1, heads=2, mlp_dim=32,
                              embed_dim=8, frame_size=16, patch_size=4, vit_width=16,
                              vit_depth=1, vit_heads=2, num_frames=4, clip_groups=2,
                              patch_grid=2, init_std=0.2)
  model = snp_model.SNPS3Model(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 256, (2, 4, 16, 16, 3)), jnp.uint8)
  fmask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
  vis, vmask = model.visual_tokens(frames, fmask)
  assert cfg.num_visual == 2 * (1 + 4) and vis.shape == (2, 10, 16)
  assert np.asarray(vmask).all()
  _, patches = model.frames(frames.reshape(8, 16, 16, 3))
  p = np.asarray(patches).reshape(2, 4, 4, 4, 16)              # (B, T, 4×4 patches, d)
  want = p[1, 2]                                               # group 1 of clip 1: frame 2 only
  pooled = want.reshape(2, 2, 2, 2, 16).mean(axis=(1, 3)).reshape(4, 16)
  np.testing.assert_allclose(np.asarray(vis[1, 2 + 4:]),
                             np.asarray(model.visual_proj(jnp.asarray(pooled))), atol=1e-5)
  _, vid = model.embed_video(vis, vmask)
  _, vid_groups = model.embed_video(vis[:, :2], vmask[:, :2])
  np.testing.assert_allclose(np.asarray(vid), np.asarray(vid_groups), atol=1e-6)
  # the cross-modal encoder takes all of them
  ids = jnp.ones((2, 8), jnp.int32)
  assert model.cross(ids, ids, vis, vmask, 1).shape == (2, 8 + 10 + 1, 16)
