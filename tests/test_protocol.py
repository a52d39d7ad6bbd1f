"""The system protocol: a toy system written here trains through the unchanged loop.

The toy (an MLP classifier on numbers it makes, with dropout, a frozen first layer and an EMA of
its weights in `extra`) is defined in this file only; nothing in bigvl knows it.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO

# ------------------------------------------------------------------------------------------ toy
from bigvl.data import stream
from bigvl.evaluators import common
from bigvl.systems import base

W = np.random.default_rng(123).standard_normal((8, 4)).astype(np.float32)  # the task: argmax x·W
TRAIN, HELD_OUT = 4096, 512   # record indices [0, TRAIN) train, [TRAIN, TRAIN + HELD_OUT) held out


def _x(i: int) -> np.ndarray:
  return np.random.default_rng(i).standard_normal(8).astype(np.float32)


class Numbers:   # random-access record bytes: the index, then x
  def __len__(self): return TRAIN
  def __getitem__(self, i): return np.concatenate([[i], _x(i)]).astype(np.float32).tobytes()


def parse(raw: bytes) -> dict:
  v = np.frombuffer(raw, np.float32)
  return {"id": np.int64(v[0]), "x": v[1:], "y": np.int32(np.argmax(v[1:] @ W))}


def collate(examples):
  return {k: np.stack([e[k] for e in examples]) for k in ("id", "x", "y")}


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, width: int = 64):
    self.frozen = nnx.Linear(8, 64, rngs=rngs)     # random features, never trained
    self.hidden = nnx.Linear(64, width, rngs=rngs)
    self.drop = nnx.Dropout(0.1)
    self.head = nnx.Linear(width, 4, rngs=rngs)

  def __call__(self, x, rng=None):
    h = jax.nn.relu(self.hidden(jnp.tanh(self.frozen(x))))
    return self.head(self.drop(h, rngs=rng, deterministic=rng is None))


class HeldOut:   # an evaluator: accuracy on records never trained on, with the chance level
  every = 0

  def run(self, predictor):
    x = np.stack([_x(i) for i in range(TRAIN, TRAIN + HELD_OUT)])
    logits = predictor.run("logits", common.Rows.of(x=x))["logits"]
    return {"heldout/accuracy": float(np.mean(logits.argmax(-1) == (x @ W).argmax(-1))),
            "heldout/chance": 0.25}


class Toy(base.System):
  name = "toy"
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("frozen")))

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict({"ema_decay": 0.9, "width": 64})

  def train_data(self, local_batch, block, blocks):
    return iter(stream.train_stream(Numbers(), parse=parse, collate=collate,
                                    reasons=(stream.BAD_RECORD,), batch_size=local_batch,
                                    seed=self.config.seed, block=block, blocks=blocks))

  def batch_spec(self, global_batch):
    return {"x": jax.ShapeDtypeStruct((global_batch, 8), jnp.float32),
            "y": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}

  def make_model(self, rngs):
    return MLP(rngs, self.config.width)

  def loss(self, model, batch, rng):
    logits = model(batch["x"], rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(logits.argmax(-1) == batch["y"])}

  def init_extra(self, params):
    return {"ema": params}

  def post_update(self, params, extra, step):
    d = self.config.ema_decay
    return params, {"ema": jax.tree.map(lambda e, p: d * e + (1 - d) * p, extra["ema"], params)}

  def predictors(self, graphdef):
    return {"logits": lambda p, b: {"logits": nnx.merge(graphdef, p)(b["x"])}}

  def evaluators(self, only=None):
    return {"heldout": HeldOut()}

  def flops_per_example(self):
    return 3 * 2 * (8 * 64 + 64 * 64 + 64 * 4)
# ------------------------------------------------------------------------------------ end of toy


def toy_config(**overrides):
  """The toy's config (and the toy in the system table: this file's tests, and config files that
  call this, are the only place it is registered)."""
  from bigvl import systems
  from bigvl.train import config_lib
  systems.SYSTEMS.setdefault("toy", Toy)
  c = config_lib.full_config("toy")
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 64, 150, 50, 10
  c.optim.lr, c.optim.warmup_steps, c.data.max_skip_fraction = 1e-2, 10, 0.0
  c.sharding_guard_min_bytes = 0
  return config_lib.finalize(config_lib.set_dotted(c, overrides))


def _rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _saved(wd, step, trainer):
  from bigvl.train import checkpoint
  ck = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
  state_target, frozen_target = trainer.shapes()
  state = ck.restore(step, state_target)
  saved_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(ck._mngr.item_metadata(step)["state"])]
  ck.close()
  return state, checkpoint.FrozenStore(wd).restore(frozen_target), saved_paths


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  from bigvl.train import loop
  wd = str(tmp_path_factory.mktemp("toy") / "straight")
  return wd, loop.train(toy_config(), wd)


def test_toy_learns_on_held_out_numbers(straight):
  wd, out = straight
  losses = [r["train/loss"] for r in _rows(wd) if "train/loss" in r]
  assert losses[0] > 1.2 and losses[-1] < 0.5, losses       # ln 4 = 1.386 at chance
  assert out["heldout/accuracy"] > 0.8 and out["heldout/chance"] == 0.25, out


def test_standalone_evaluation_of_the_toy_gives_the_training_figures(straight):
  """launch/eval.py's path: the checkpoint and the frozen weights beside it, the same predictor."""
  from bigvl.train import evaluate
  wd, out = straight
  got = evaluate.evaluate(toy_config(), wd)
  assert got["step"] == 150 and got["heldout/accuracy"] == out["heldout/accuracy"]


def test_frozen_layer_never_changes_and_has_no_optimizer_state(straight):
  from bigvl.train import loop
  wd, _ = straight
  trainer = loop.build(toy_config())
  state0, frozen0 = trainer.init(jax.random.key(0))
  state, frozen, saved_paths = _saved(wd, 150, trainer)
  assert set(frozen) == {"frozen"} and "frozen" not in state["params"]
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # Saved once beside the checkpoints, in none of them; no optimizer state, no EMA of it.
  assert not [p for p in saved_paths if "frozen" in p], saved_paths
  assert os.path.isdir(os.path.join(wd, "frozen"))
  # Trained weights did move, and the EMA follows them without equalling them.
  assert not np.array_equal(state0["params"]["head"]["kernel"], state["params"]["head"]["kernel"])
  assert not np.array_equal(state["extra"]["ema"]["head"]["kernel"],
                            state["params"]["head"]["kernel"])


def test_stopped_and_resumed_run_is_bit_identical(straight, tmp_path):
  """Dropout draws from fold_in(key(seed), step) and the EMA is checkpointed: a run stopped at
  step 67 and resumed ends with the bytes (params, frozen and EMA) of the straight run."""
  from bigvl.train import loop
  wd, out = straight
  part = str(tmp_path / "resumed")
  loop.train(toy_config(), part, stop_at=67)
  resumed = loop.train(toy_config(), part)
  assert resumed["params_sha256"] == out["params_sha256"]
  assert resumed["data/ids_sha256"] == out["data/ids_sha256"]
  # The digest covers the EMA: another decay gives other bytes with the same parameters' path.
  other = loop.train(toy_config(ema_decay=0.5, total_steps=67), str(tmp_path / "other"))
  same_steps = loop.train(toy_config(total_steps=67), str(tmp_path / "same"))
  assert other["params_sha256"] != same_steps["params_sha256"]


def test_param_group_multiplier_zero_leaves_the_group_at_init(tmp_path):
  from bigvl.train import loop

  class Grouped(Toy):
    def param_groups(self):
      return (("^head/", 0.0), ("^hidden/", 0.5))

  from bigvl import systems
  systems.SYSTEMS["toy_grouped"] = Grouped
  try:
    c = toy_config(total_steps=5, checkpoint_every=5)
    with c.unlocked():
      c.system = "toy_grouped"
    trainer = loop.build(c)
    state0, _ = trainer.init(jax.random.key(0))
    loop.train(c, str(tmp_path / "g"))
    state, _, _ = _saved(str(tmp_path / "g"), 5, trainer)
  finally:
    del systems.SYSTEMS["toy_grouped"]
  np.testing.assert_array_equal(state0["params"]["head"]["kernel"], state["params"]["head"]["kernel"])
  assert not np.array_equal(state0["params"]["hidden"]["kernel"],
                            state["params"]["hidden"]["kernel"])


def test_scale_by_group_scales_the_whole_adamw_step():
  from bigvl.train import optim
  o = toy_config().optim
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
  grads = {"a": jnp.full((3, 3), 0.3), "b": jnp.full((3, 3), 0.3)}
  plain = optim.adamw(o, lambda _: 1e-2)
  half = optax.chain(plain, optim.scale_by_group(lambda path: 0.5 if path == "b" else 1.0))
  u1, _ = plain.update(grads, plain.init(params), params)
  u2, _ = half.update(grads, half.init(params), params)
  np.testing.assert_array_equal(u2["a"], u1["a"])
  np.testing.assert_allclose(u2["b"], 0.5 * u1["b"], rtol=1e-7)


def test_init_from_loads_a_subset_and_says_what(straight, tmp_path):
  """Another seed, then the frozen and hidden layers (and nothing else) from the straight run."""
  from bigvl.export import params_io
  from bigvl.train import checkpoint, loop
  wd, _ = straight
  c = toy_config(seed=1, total_steps=1, init_from=wd, init_from_pattern="^(frozen|hidden)/",
                 **{"optim.lr": 0.0})
  loop.train(c, str(tmp_path / "b"))
  report = json.load(open(tmp_path / "b" / "init_from.json"))
  assert report["loaded"] == ["frozen/bias", "frozen/kernel", "hidden/bias", "hidden/kernel"]
  assert report["left_at_init"] == ["head/bias", "head/kernel"] and report["unused"] == []
  trainer = loop.build(c)
  a_state, a_frozen, _ = _saved(wd, 150, trainer)
  b_state, b_frozen, _ = _saved(str(tmp_path / "b"), 1, trainer)
  np.testing.assert_array_equal(a_frozen["frozen"]["kernel"], b_frozen["frozen"]["kernel"])
  np.testing.assert_array_equal(a_state["params"]["hidden"]["kernel"],
                                b_state["params"]["hidden"]["kernel"])
  fresh, _ = trainer.init(jax.random.key(1))   # the head: seed 1's init, untouched at lr 0
  np.testing.assert_array_equal(fresh["params"]["head"]["kernel"],
                                b_state["params"]["head"]["kernel"])
  # Another shape is an error naming every such parameter; so is a pattern the source lacks.
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"3 parameter\(s\) of another shape.*"
                     r"head/kernel: \(64, 4\).*hidden/bias.*hidden/kernel"):
    loop.train(toy_config(width=32, init_from=wd), str(tmp_path / "c"))
  assert checkpoint.CheckpointMismatchError is params_io.CheckpointMismatchError


def _toy_config_file(tmp_path) -> str:
  path = tmp_path / "toy_config.py"
  path.write_text(f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
                  "from test_protocol import toy_config\n\n"
                  "def get_config():\n  return toy_config()\n")
  return str(path)


def test_bench_train_runs_on_the_toy(tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  p = subprocess.run([sys.executable, "launch/bench_train.py", f"--config={_toy_config_file(tmp_path)}",
                      "--steps=2", "--warmup=1", f"--json={out}"], cwd=REPO, capture_output=True,
                     text=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["config"]["system"] == "toy" and r["step_time_s"] > 0
  assert r["flops_per_sample_analytic"] == Toy.flops_per_example(None) and 0 < r["mfu"] < 1


def test_plan_runs_on_the_toy(tmp_path):
  from bigvl.parallel import topology
  if not topology.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  out = tmp_path / "plan.json"
  p = subprocess.run([sys.executable, "launch/plan.py", f"--config={_toy_config_file(tmp_path)}",
                      "--topology=v5e-4", f"--json={out}"], cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["system"] == "toy" and r["chips"] == 4 and r["fits"]
  assert r["trainable_params"] == r["params"] - (8 * 64 + 64)   # the frozen layer is not trained
  assert r["flops_per_step"]["model_analytic"] == 64 * Toy.flops_per_example(None)


def test_load_matching_reports_loaded_left_and_unused(tmp_path):
  """From a parameter directory holding part of the toy plus a tensor it does not have."""
  from bigvl.export import params_io
  from bigvl.train import loop
  trainer = loop.build(toy_config())
  state, frozen = trainer.init(jax.random.key(0))
  tok = tmp_path / "tok.model"
  tok.write_bytes(b"unused here")
  held = {"frozen": frozen["frozen"], "head": state["params"]["head"], "other": {"w": np.ones(3)}}
  params_io.save_params(str(tmp_path / "p"), held, tokenizer_file=str(tok),
                        config_json={"model": {}, "tokenizer": {"max_len": 8, "lowercase": True}})
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loop.merge_params(
      trainer.abstract["params"], trainer.frozen_abstract))
  loaded, report = params_io.load_matching(str(tmp_path / "p"), target)
  assert sorted(loaded) == report["loaded"] == ["frozen/bias", "frozen/kernel", "head/bias",
                                                "head/kernel"]
  assert report["left_at_init"] == ["hidden/bias", "hidden/kernel"]
  assert report["unused"] == ["other/w"]
  np.testing.assert_array_equal(loaded["head/kernel"], state["params"]["head"]["kernel"])
  with pytest.raises(params_io.CheckpointMismatchError, match="lacks 2 parameter.*hidden"):
    params_io.load_matching(str(tmp_path / "p"), target, pattern="^(hidden|head)/")


def test_default_accumulation_is_the_mean_over_micro_batches():
  """accum_steps=2: loss, aux and gradient are the means of the two halves' (each shard's rows
  split locally), micro-batch k drawing from fold_in(rng, k)."""
  from bigvl.train import loop

  class TwoSteps(Toy):
    accum_steps = 2

  t = loop.build(toy_config(batch_size=32))
  system = TwoSteps(t.system.config, t.mesh, t.rules)
  state, frozen = t.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((32, 8)).astype(np.float32),
           "y": rng.integers(0, 4, 32).astype(np.int32)}
  key = jax.random.key(3)
  (loss, aux), grads = system.value_and_grad(t.graphdef, state["params"], frozen, batch, key)
  dp = t.dp
  rows = np.arange(32).reshape(dp, 2, -1)   # shard s holds 32/dp rows; micro-batch k their k-th half
  want = []
  for k in range(2):
    mb = {n: v[rows[:, k].reshape(-1)] for n, v in batch.items()}
    want.append(base.System.value_and_grad(t.system, t.graphdef, state["params"], frozen, mb,
                                           jax.random.fold_in(key, k)))
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *want)
  np.testing.assert_allclose(loss, mean[0][0], rtol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], mean[0][1]["accuracy"], rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(mean[1])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_scheduled_scalars_reach_every_micro_batch():
  """A `scheduled` scalar rides in the batch: accumulation splits the rows, not the scalar, so with
  accum_steps=2 the loss is still the mean of the two halves' at that scalar."""
  from bigvl.train import loop

  class Scaled(Toy):
    def loss(self, model, batch, rng):
      logits = model(batch["x"], rng) * batch["scale"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}

  class ScaledTwoSteps(Scaled):
    accum_steps = 2

  t = loop.build(toy_config(batch_size=32))
  state, frozen = t.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((32, 8)).astype(np.float32),
           "y": rng.integers(0, 4, 32).astype(np.int32), "scale": jnp.float32(3.0)}
  key = jax.random.key(3)
  two = ScaledTwoSteps(t.system.config, t.mesh, t.rules)
  (loss, _), _ = two.value_and_grad(t.graphdef, state["params"], frozen, batch, key)
  one = Scaled(t.system.config, t.mesh, t.rules)
  rows = np.arange(32).reshape(t.dp, 2, -1)
  halves = [one.value_and_grad(t.graphdef, state["params"], frozen,
                               {**{n: batch[n][rows[:, k].reshape(-1)] for n in ("x", "y")},
                                "scale": batch["scale"]}, jax.random.fold_in(key, k))[0][0]
            for k in range(2)]
  np.testing.assert_allclose(loss, np.mean(halves), rtol=1e-6)
  unscaled = one.value_and_grad(t.graphdef, state["params"], frozen,
                                {**batch, "scale": jnp.float32(1.0)}, key)[0][0]
  assert abs(float(loss) - float(unscaled)) > 1e-3   # the scalar did reach the loss
