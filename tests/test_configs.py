"""Every config loads, carries the keys other tools rely on, and fails early with a useful message."""

import glob
import importlib.util
import os

import pytest

from bigvl.models import m2_encoder
from bigvl.train import config_lib
from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_has_the_contract_keys(path):
  c = _load(path)
  for key in ("batch_size", "total_steps", "checkpoint_every", "seed"):
    assert key in c, key
  if "variant" in c.model:     # the systems on M²-Encoder's towers (SNP-S3 has its own sizes)
    assert c.model.variant in m2_encoder.VARIANTS
  config_lib.validate(c, check_paths=False)
  with pytest.raises(AttributeError):
    c.batch_sise = 8   # locked: a misspelt key is an error


def test_shards_config_without_data_says_what_to_set():
  c = _load(os.path.join(REPO, "configs", "m2_10b.py"))
  with pytest.raises(config_lib.ConfigError, match="data.train_files"):
    config_lib.validate(c)


def test_train_files_with_a_world_config_is_an_error_naming_the_key(tmp_path):
  """--config.data.train_files on configs/m2_tiny.py (the embedded world) used to train on the world
  silently; it is an error that says to set data.kind=shards. Evaluation needs no training files."""
  c = _load(os.path.join(REPO, "configs", "m2_tiny.py"))
  with c.unlocked():
    c.data.train_files = str(tmp_path / "train-*.array_record")
  with pytest.raises(config_lib.ConfigError, match=r"--config.data.kind=shards"):
    config_lib.validate(c)
  big = _load(os.path.join(REPO, "configs", "m2_0p4b.py"))
  config_lib.validate(big, training=False)       # eval.py on an imported checkpoint


@pytest.mark.parametrize("script", ["train.py", "eval.py", "plan.py", "bench_train.py"])
def test_misspelt_key_is_a_one_line_error_in_every_launcher(script):
  import subprocess
  import sys
  flags = {"plan.py": ["--topology=v5e-4"], "bench_train.py": []}.get(script, ["--workdir=/tmp/x"])
  p = subprocess.run([sys.executable, f"launch/{script}", "--config=configs/m2_tiny.py", *flags,
                      "--config.optim.lrr=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
  assert "unknown config key 'lrr'" in lines[0] and '"lr"' in lines[0], lines[0]


def test_a_system_key_misspelt_in_a_config_file_is_named_with_a_suggestion():
  c = config_lib.full_config("m2_encoder")
  c.model.widht = 64   # unlocked: as a config file would write it
  with pytest.raises(config_lib.ConfigError, match=r"'model.widht' \(did you mean 'model.width'\?\)"):
    config_lib.validate(c)
  c = config_lib.full_config("m2_encoder")
  c.system = "m3_encoder"
  with pytest.raises(config_lib.ConfigError, match="m3_encoder.*m2_encoder"):
    config_lib.validate(c)
