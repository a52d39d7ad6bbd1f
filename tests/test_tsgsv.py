"""TSGSV: Gaussian labels, focal BCE, the compressor, causality of the streaming API and of the
batched evaluation, streaming = batched, grounding metrics, the stream world, ActivityNet / TACoS
style JSON with .npy and HDF5 features, a short run of the loop."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.data.formats import grounding
from bigvl.evaluators import common, grounding as grounding_eval, grounding_metrics as gm
from bigvl.losses import grounding as gl
from bigvl.models import tsgsv as model_lib
from bigvl.systems.tsgsv.streaming import StreamingGrounder

D, LONG, SHORT, FUT = 12, 16, 4, 16


class _Tok:
  """A stand-in tokenizer: words → ids by hashing (the model only needs ids and a mask)."""
  max_len = 10

  def encode(self, text):
    ids = np.zeros(self.max_len, np.int32)
    mask = np.zeros(self.max_len, np.int32)
    words = [1] + [5 + (sum(map(ord, w)) % 40) for w in text.split()][:self.max_len - 2] + [2]
    ids[:len(words)] = words
    mask[:len(words)] = 1
    return ids, mask


def _model(twin=True, seed=0):
  cfg = model_lib.TSGSVConfig(feature_dim=D, vocab_size=50, max_len=10, width=16, heads=2,
                              mlp_dim=32, text_depth=1, decoder_depth=2, compress=(4, 4),
                              long=LONG, short=SHORT, future=FUT, twin=twin, init_std=0.2)
  model = model_lib.TSGSVModel(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  return model, graphdef, params


def test_gaussian_labels_equal_the_closed_form():
  s, e = 3.0, 11.0
  t = np.arange(16)
  got = gl.gaussian_labels(s, e, t)
  span = e - s
  want_start = np.exp(-(t - s) ** 2 / (2 * (0.25 * span) ** 2))
  want_end = np.exp(-(t - e) ** 2 / (2 * (0.25 * span) ** 2))
  want_in = np.exp(-(t - 7.0) ** 2 / (2 * (0.21 * span) ** 2))
  np.testing.assert_allclose(got[:, 0], want_start, rtol=1e-6)
  np.testing.assert_allclose(got[:, 1], want_end, rtol=1e-6)
  np.testing.assert_allclose(got[:, 2], want_in, rtol=1e-6)
  assert got[3, 0] == pytest.approx(1.0) and got[11, 1] == pytest.approx(1.0)
  assert got[7, 2] == pytest.approx(1.0)
  # seconds → frame positions: duration 10 s over 21 frames puts 2.5 s at frame 5
  assert gl.moment_frames(2.5, 5.0, 10.0, 21) == (5.0, 10.0)


def test_focal_bce_equals_a_hand_computed_case():
  z = jnp.asarray([[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]])
  y = jnp.asarray([[[1.0, 0.2, 0.6], [0.5, 0.0, 1.0]]])
  valid = jnp.asarray([[True, False]])   # the second frame is padding
  loss, per = gl.focal_bce(z, y, valid, gamma=3.0)
  sig = lambda v: 1 / (1 + math.exp(-v))
  want = []
  for zi, yi in zip([2.0, -1.0, 0.5], [1.0, 0.2, 0.6]):
    bce = -(yi * math.log(sig(zi)) + (1 - yi) * math.log(1 - sig(zi)))
    want.append(abs(sig(zi) - yi) ** 3 * bce)
  np.testing.assert_allclose(np.asarray(per), want, rtol=1e-5)
  assert float(loss) == pytest.approx(0.5 * want[0] + 0.5 * want[1] + want[2], rel=1e-5)
  # the focal factor is not differentiated: d/dz = factor · (σ(z) − y)
  g = jax.grad(lambda v: gl.focal_bce(v, y, valid)[0])(z)
  s0 = sig(2.0)
  assert float(g[0, 0, 0]) == pytest.approx(0.5 * abs(s0 - 1) ** 3 * (s0 - 1), rel=1e-4)
  assert float(jnp.abs(g[0, 1]).sum()) == 0.0


@pytest.mark.parametrize("length", [1, 5, 16, 40])
def test_the_compressor_returns_its_tokens_for_any_memory_length(length):
  model, _, _ = _model()
  rng = np.random.default_rng(length)
  x = jnp.asarray(rng.standard_normal((2, length, 16)), jnp.float32)
  mask = jnp.ones((2, length), jnp.int32).at[1, :length // 2].set(0)
  q = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
  out = model.compress(x, mask, q)
  assert out.shape == (2, 4, 16) and bool(jnp.isfinite(out).all())
  # an empty memory (the stream's start) compresses to zeros, not NaN
  empty = model.compress(x, jnp.zeros((2, length), jnp.int32), q)
  assert bool(jnp.isfinite(empty).all()) and float(jnp.abs(empty).max()) < 1e-3
  # masked frames do not count: changing them changes nothing
  y = x.at[1, :length // 2].set(7.0)
  np.testing.assert_allclose(np.asarray(model.compress(y, mask, q)), np.asarray(out), atol=1e-5)


def test_the_default_compressor_gives_16_tokens():
  cfg = model_lib.TSGSVConfig(feature_dim=D, vocab_size=50, width=16, heads=2, mlp_dim=32)
  model = model_lib.TSGSVModel(cfg, rngs=nnx.Rngs(0))
  for n in (3, 64, 100):
    out = model.compress(jnp.ones((1, n, 16)), jnp.ones((1, n), jnp.int32), jnp.ones((1, 16)))
    assert out.shape == (1, 16, 16)


def _evaluator(feats: np.ndarray, stride: int, sentence="the red circle moves left"):
  class Store:
    def load(self, video):
      return feats

    def length(self, video):
      return len(feats)
  t = len(feats)
  q = grounding.Query("v", duration=(t - 1) / 2.0, start=2.0, end=6.0, sentence=sentence,
                      lang="en")
  return grounding_eval.GroundingEvaluator(queries=[q], store=Store(), tokenizer=_Tok(),
                                           long=LONG, short=SHORT, stride=stride)


def _predictor(graphdef, params):
  def ground(p, b):
    logits = nnx.merge(graphdef, p)(b["features"], b["feature_mask"], b["text"],
                                    b["text_mask"])["logits"]
    return {"scores": jax.nn.sigmoid(logits)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  return common.sharded_predictor({"ground": ground}, mesh, 16)(params)


@pytest.mark.parametrize("stride", [SHORT, 1])
def test_no_future_leak_and_streaming_equals_batched(stride):
  _, graphdef, params = _model()
  rng = np.random.default_rng(0)
  t_len = 45
  feats = rng.standard_normal((t_len, D)).astype(np.float32)
  predictor = _predictor(graphdef, params)
  batched = _evaluator(feats, stride).scores(predictor)[0]
  assert batched.shape == (t_len, 3)
  stream = StreamingGrounder(params, "the red circle moves left", graphdef=graphdef,
                             tokenizer=_Tok(), long=LONG, short=SHORT, stride=stride)
  pieces, at = [], 0
  for n in (1, 3, 7, 2, 13, 19):
    pieces.append(stream.push(feats[at:at + n]))
    at += n
  streamed = np.concatenate(pieces)
  np.testing.assert_allclose(streamed, batched, atol=2e-5)
  # changing any frame after t never changes a score at or before t
  for t in (0, 3, 4, 17, 30):
    changed = feats.copy()
    changed[t + 1:] = rng.standard_normal(changed[t + 1:].shape) * 5
    after = _evaluator(changed, stride).scores(predictor)[0]
    np.testing.assert_allclose(after[:t + 1], batched[:t + 1], atol=2e-5)
    assert not np.allclose(after[t + 1:], batched[t + 1:], atol=1e-3)
    g = StreamingGrounder(params, "the red circle moves left", graphdef=graphdef,
                          tokenizer=_Tok(), long=LONG, short=SHORT, stride=stride)
    np.testing.assert_allclose(g.push(changed[:t + 1]), batched[:t + 1], atol=2e-5)
  # the grounder holds the last long + short frames only
  assert stream.buf.shape == (LONG + SHORT, D)


def test_the_twin_reads_the_future_and_the_main_branch_does_not():
  model, _, _ = _model()
  rng = np.random.default_rng(1)
  n = LONG + SHORT + FUT
  feats = jnp.asarray(rng.standard_normal((2, n, D)), jnp.float32)
  mask = jnp.ones((2, n), jnp.int32)
  ids, tmask = (jnp.asarray(np.stack([x, x])) for x in _Tok().encode("a b c"))
  out = model(feats, mask, ids, tmask, twin=True)
  changed = feats.at[:, LONG + SHORT:].set(3.0)
  out2 = model(changed, mask, ids, tmask, twin=True)
  np.testing.assert_allclose(np.asarray(out2["logits"]), np.asarray(out["logits"]), atol=1e-5)
  assert not np.allclose(np.asarray(out2["twin_logits"]), np.asarray(out["twin_logits"]),
                         atol=1e-3)
  assert out["logits"].shape == (2, SHORT, 3)


def test_grounding_metrics_on_hand_cases():
  np.testing.assert_allclose(gm.iou(np.array([[0, 2], [1, 3], [5, 6]]), (1, 2)), [0.5, 0.5, 0])
  # a peak at frames 2 (start) and 6 (end) of 11 over 10 s: the best proposal is [2, 6] s
  start = np.full(11, 0.01)
  end = np.full(11, 0.01)
  start[2], end[6] = 0.9, 0.8
  props, scores = gm.proposals(start, end, 10.0, top=3, nms=0.5)
  np.testing.assert_allclose(props[0], [2.0, 6.0])
  assert scores[0] == pytest.approx(0.72) and len(props) == 3
  for a in range(len(props)):          # NMS: no two kept proposals overlap by more than 0.5
    for b in range(a):
      assert gm.iou(props[a:a + 1], props[b])[0] <= 0.5
  r = gm.recall([props, np.array([[0.0, 1.0]])], [(2.0, 6.5), (5.0, 9.0)], ks=(1, 5),
                ious=(0.5, 0.7))
  assert r == {"r1_iou0.5": 0.5, "r1_iou0.7": 0.5, "r5_iou0.5": 0.5, "r5_iou0.7": 0.5}
  # calibrated AP: labels 1 0 1 0 0 0 by descending score; w = 4 / 2 = 2
  scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
  labels = np.array([1, 0, 1, 0, 0, 0], bool)
  want = (1 / (1 + 0 / 2) + 2 / (2 + 1 / 2)) / 2
  assert gm.calibrated_ap(scores, labels) == pytest.approx(want)
  # with as many negatives as positives (w = 1) it is the plain AP
  balanced = np.array([1, 0, 1, 0], bool)
  plain = (1 / 1 + 2 / 3) / 2
  assert gm.calibrated_ap(np.array([4, 3, 2, 1.0]), balanced) == pytest.approx(plain)
  assert gm.calibrated_ap(scores, np.zeros(6, bool)) == 1.0
  np.testing.assert_array_equal(gm.moment_mask((2.0, 4.0), 10.0, 11),
                                [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  # long sequences are median-filtered and subsampled, proposals still in seconds
  long_s, long_e = np.full(600, 0.01), np.full(600, 0.01)
  long_s[100:103], long_e[300:303] = 0.9, 0.9
  p, _ = gm.proposals(long_s, long_e, 599.0, top=1)
  assert abs(p[0, 0] - 101) < 3 and abs(p[0, 1] - 301) < 3


def test_the_stream_world_is_deterministic_and_its_events_are_in_the_features():
  from data_pipelines import stream_world as sw
  vid, f, ann = sw.make_stream(0, "train", 7)
  vid2, f2, ann2 = sw.make_stream(0, "train", 7)
  assert vid == vid2 and np.array_equal(f, f2) and ann == ann2
  assert 128 <= len(f) <= 256 and f.shape[1] == 64
  assert len(ann["sentences"]) == len(ann["sentences_zh"]) == len(ann["timestamps"]) >= 1
  assert len(set(ann["sentences"])) == len(ann["sentences"])      # queries unique per stream
  clean = sw.make_stream(0, "train", 7, noise=0.0)[1]
  quiet = np.ones(len(clean), bool)
  for ev in ann["events"]:
    a, b = ev["start_frame"], ev["end_frame"]
    assert np.linalg.norm(clean[b] - clean[max(a - 1, 0)]) > 0.3    # something changes
    quiet[a:b + 1] = False
  moving = np.linalg.norm(np.diff(clean, axis=0), axis=1)
  assert np.all(moving[quiet[1:] & quiet[:-1]] < 1e-5)              # nothing changes between
  for (s, e), ev in zip(ann["timestamps"], ann["events"]):
    assert s * 2.0 == ev["start_frame"] and e * 2.0 == ev["end_frame"]   # fps 2


def _write_anet(tmp_path, rng, n_videos=4, dim=D, tacos=False):
  feats_dir = tmp_path / ("tacos_feats" if tacos else "feats")
  feats_dir.mkdir(exist_ok=True)
  ann = {}
  for i in range(n_videos):
    t = int(rng.integers(20, 40))
    np.save(feats_dir / f"v{i}.npy", rng.standard_normal((t, dim)).astype(np.float32))
    if tacos:
      ann[f"v{i}"] = {"num_frames": t * 10, "fps": 5.0, "timestamps": [[10, 60], [50, 120]],
                      "sentences": ["a person cuts", "a person washes"]}
    else:
      ann[f"v{i}"] = {"duration": t / 2.0, "timestamps": [[1.0, 4.0], [3.0, 8.5]],
                      "sentences": ["someone jumps", "someone sits down"]}
  path = tmp_path / ("tacos.json" if tacos else "train.json")
  path.write_text(json.dumps(ann))
  return str(path), str(feats_dir)


def test_activitynet_and_tacos_json_and_hdf5_features(tmp_path):
  import h5py
  rng = np.random.default_rng(0)
  path, feats = _write_anet(tmp_path, rng)
  qs = grounding.read_annotations(path)
  assert len(qs) == 8 and qs[1].start == 3.0 and qs[1].end == 8.5
  tpath, _ = _write_anet(tmp_path, rng, tacos=True)
  tq = grounding.read_annotations(tpath)
  assert tq[0].start == 2.0 and tq[0].end == 12.0          # frames / fps
  # HDF5 as ActivityNet's C3D (a group per video) and MAD's (a dataset per video)
  store = grounding.FeatureStore(feats)
  with h5py.File(tmp_path / "c3d.hdf5", "w") as f:
    for i in range(4):
      f.create_group(f"v{i}").create_dataset("c3d_features", data=store.load(f"v{i}"))
  with h5py.File(tmp_path / "mad.h5", "w") as f:
    for i in range(4):
      f.create_dataset(f"v{i}", data=store.load(f"v{i}"))
  for spec in ("h5:" + str(tmp_path / "c3d.hdf5"), str(tmp_path / "mad.h5")):
    np.testing.assert_array_equal(grounding.FeatureStore(spec).load("v2"), store.load("v2"))
  with pytest.raises(ValueError, match="'v9'"):
    store.load("v9")
  assert store.length("v2") == len(store.load("v2"))
  assert grounding.FeatureStore(str(tmp_path / "mad.h5")).length("v2") == len(store.load("v2"))
  # training windows: labels at the short frames, masks at the stream's edges
  lengths = grounding.video_lengths(store, [q.video for q in qs])
  src = grounding.WindowSource(qs, lengths, SHORT)
  assert len(src) == sum(grounding.windows_per_query(lengths[q.video], SHORT) for q in qs)
  parse = grounding._Parse(qs, store, _Tok(), LONG, SHORT, FUT)
  ex = parse(src[0], draw=None)            # phase 0: window [-3, 1): one real frame
  assert ex["label_mask"].tolist() == [0, 0, 0, 1]
  assert ex["feature_mask"][:LONG].sum() == 0 and ex["feature_mask"][LONG + 3] == 1
  t0 = lengths["v0"]
  want = gl.gaussian_labels(*gl.moment_frames(1.0, 4.0, t0 / 2.0, t0), np.arange(-3, 1))
  np.testing.assert_allclose(ex["labels"], want)
  # a non-finite feature array is a skipped record with its reason, naming the video
  np.save(os.path.join(feats, "v1.npy"), np.full((lengths["v1"], D), np.nan, np.float32))
  from bigvl.data import stream
  bad_index = next(i for i in range(len(src)) if qs[json.loads(src[i])[0]].video == "v1")
  with pytest.raises(stream.RecordFailure) as failure:
    parse(src[bad_index], draw=None)
  assert failure.value.reason == grounding.BAD_FEATURES and "'v1'" in str(failure.value)
  # malformed annotations name the file and the video
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"vx": {"duration": 5.0, "timestamps": [[4.0, 2.0]],
                                    "sentences": ["x"]}}))
  with pytest.raises(ValueError, match=r"bad\.json: video 'vx'"):
    grounding.read_annotations(str(bad))
  bad.write_text(json.dumps({"vy": {"timestamps": [[1, 2]], "sentences": ["x"]}}))
  with pytest.raises(ValueError, match="'vy': needs 'duration'"):
    grounding.read_annotations(str(bad))


def _tokenizer_file(tmp_path):
  from bigvl.tokenizers import sp_train
  words = "someone jumps sits down a person cuts washes the red circle moves left".split()
  text = [" ".join(np.random.default_rng(i).choice(words, 6)) for i in range(200)]
  return sp_train.train_sentencepiece(text, str(tmp_path / "tok.model"), 64)


def test_activitynet_json_trains_and_evaluates_through_the_loop(tmp_path):
  from bigvl.train import config_lib, loop
  rng = np.random.default_rng(3)
  path, feats = _write_anet(tmp_path, rng, n_videos=6, dim=20)
  c = config_lib.full_config("tsgsv")
  c.data.kind = "json"
  c.data.train_json, c.data.features = path, feats
  c.tokenizer.path = _tokenizer_file(tmp_path)
  c.model.update(dict(width=16, heads=2, mlp_dim=32, text_depth=1, decoder_depth=1,
                      compress=(4,), long=8, short=4, future=8))
  c.evals.grounding.source = "json:" + path
  c.evals.grounding.features = feats
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 8, 3, 3, 1
  loop.train(c, str(tmp_path / "run"))
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  final = next(r for r in reversed(rows) if "grounding/r1_iou0.5" in r)
  for k in ("grounding/r1_iou0.3", "grounding/r5_iou0.7", "grounding/mcap",
            "grounding/chance/r1_iou0.5", "grounding/n"):
    assert k in final
  assert final["grounding/n"] == 12
  train = [r for r in rows if "train/loss_twin" in r]
  assert train and all(math.isfinite(r["train/loss"]) for r in train)
  # the run's checkpoint drives the streaming API
  g = StreamingGrounder.from_run(str(tmp_path / "run"), "someone jumps")
  scores = g.push(np.load(os.path.join(feats, "v0.npy")))
  assert scores.shape[1] == 3 and np.all((scores >= 0) & (scores <= 1))
