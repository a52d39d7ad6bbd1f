"""Shared fixtures: a tiny embedded world built once per test session, and small configs."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# One persistent XLA compilation cache for the whole test session, this process and every
# subprocess it starts (they inherit the environment): many tests compile the same small train
# step, and on a 2-core CPU compiling it costs far more than running it (m2_tiny on 8 fake devices:
# 3 steps in 102 s compiling, 26 s from the cache). Fresh per session, so nothing stale is read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="bigvl_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Tests run on the CPU (fake devices). Without this, a process where libtpu is installed first tries
# to start a TPU backend, and holds libtpu's lockfile, which fails later AOT compiles for TPU
# topologies in subprocesses ("Internal error when accessing libtpu multi-process lockfile").
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
  """A small synthetic world (24 px images) for tests of the machinery, not of accuracy."""
  from data_pipelines import build_world
  out = str(tmp_path_factory.mktemp("world") / "w24")
  build_world.build(out, seed=0, image_size=24, num_train=512, num_eval=72, num_shards=2,
                    vocab_size=384)
  return out


def small_config(world_dir: str, config: str = "m2_tiny", **overrides):
  """configs/<config>.py (a tiny config on M²-Encoder's towers) shrunk further so a training step
  takes milliseconds."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(config, os.path.join(REPO, f"configs/{config}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.dir = world_dir
  c.data.world.num_train, c.data.world.num_eval, c.data.world.num_shards = 512, 72, 2
  c.data.world.vocab_size = 384
  c.model.update(dict(width=32, heads=2, depth=1, vl_depth=1, mlp_dim=64, out_dim=16,
                      patch_size=8, image_size=24, text_positions=64))
  c.tokenizer.max_len = 24
  c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 16, 4, 2, 1
  c.optim.warmup_steps = 1
  c.evals.zeroshot.batch_size = 64
  from bigvl.train import config_lib
  return config_lib.set_dotted(c, overrides)


@pytest.fixture(scope="session")
def m2_backbone(tiny_world, tmp_path_factory):
  """Towers for the systems built on them (`init_from`), trained once per test process."""
  return train_m2_backbone(tiny_world, str(tmp_path_factory.mktemp("backbone") / "m2"))


def train_m2_backbone(world_dir: str, workdir: str) -> str:
  """A 2-step M²-Encoder run at small_config's sizes: towers for the systems built on them."""
  from bigvl.train import loop
  c = small_config(world_dir, total_steps=2, checkpoint_every=2,
                   **{"evals.zeroshot_all.source": "", "evals.retrieval.source": "",
                      "evals.zeroshot.source": ""})
  loop.train(c, workdir)
  return workdir


def towers_config(system: str, world_dir: str, backbone_dir: str, **overrides):
  """The default config of a system on towers (`tai_adapter`, `switch_bert`) over `backbone_dir`
  (`m2_backbone`), on the tiny world and a small scene world; `overrides` as dotted keys."""
  from bigvl.train import config_lib
  c = config_lib.full_config(system)
  c.init_from = backbone_dir
  c.data.dir = world_dir
  c.data.world.update(dict(num_train=512, num_eval=72, num_shards=2, vocab_size=384))
  c.data.scenes.update(dict(num_train=64, num_eval=48, num_shards=1))
  c.batch_size, c.checkpoint_every, c.log_every = 16, 100, 1
  c.optim.warmup_steps = 1
  for entry in c.evals.values():
    entry.batch_size = 64
  return config_lib.finalize(config_lib.set_dotted(c, overrides))
