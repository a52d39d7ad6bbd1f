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
  assert c.model.variant in m2_encoder.VARIANTS
  with pytest.raises(AttributeError):
    c.batch_sise = 8   # locked: a misspelt key is an error


def test_shards_config_without_data_says_what_to_set():
  c = _load(os.path.join(REPO, "configs", "m2_10b.py"))
  with pytest.raises(config_lib.ConfigError, match="data.train_files"):
    config_lib.validate(c)
