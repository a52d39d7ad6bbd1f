"""File digests of a checkpoint: who writes which file, what a check reports, and that a checkpoint
of the earlier format (per-array fingerprints) still restores and verifies."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_each_file_has_one_owner():
  from bigvl.train import verify
  assert verify.file_owner("state/ocdbt.process_3/d/abc") == 3
  assert verify.file_owner("state/array_metadatas/process_12") == 12
  assert verify.file_owner("data/process_1-of-2.json") == 1
  assert verify.file_owner("state/d/abc") == 0
  assert verify.file_owner("state/manifest.ocdbt") == 0
  assert verify.file_owner("_CHECKPOINT_METADATA") == 0


def test_check_files_names_every_kind_of_damage(tmp_path):
  from bigvl.train import verify
  rng = np.random.default_rng(0)
  for name in ("a", "b", "c", "sub/d", "empty"):
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_bytes(rng.bytes(5000) if name != "empty" else b"")
  files = verify.list_files(str(tmp_path))
  assert files == ["a", "b", "c", "empty", "sub/d"]
  saved = verify.digest_files(str(tmp_path), files)
  assert verify.check_files(str(tmp_path), saved) == []
  raw = bytearray((tmp_path / "a").read_bytes())
  raw[2500] ^= 1                                   # one flipped bit
  (tmp_path / "a").write_bytes(bytes(raw))
  os.truncate(tmp_path / "b", 100)
  os.remove(tmp_path / "sub/d")
  problems = verify.check_files(str(tmp_path), saved)
  assert [p.split(":")[0] for p in problems] == ["b", "sub/d", "a"], problems
  assert "its bytes changed" in problems[2] and "missing" in problems[1] and "100 bytes" in problems[0]


def test_nonfinite_arrays_names_them():
  from bigvl.train import verify
  tree = {"w": jnp.ones((3,)), "b": {"x": jnp.array([1.0, jnp.nan])}, "i": jnp.arange(3),
          "e": jnp.zeros((0,))}
  assert verify.nonfinite_arrays(tree) == ["b/x"]


def _state():
  return {"params": {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)},
          "step": jnp.array(3, jnp.int32)}


def test_a_save_records_digests_and_a_restore_checks_them(tmp_path):
  from bigvl.train import checkpoint
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, _state())
  step_dir = tmp_path / "ck" / "1"
  rec = json.load(open(step_dir / "digests.process_0.json"))
  assert rec["format"] == checkpoint.VERIFY_FORMAT and rec["step"] == 1
  assert "state/_METADATA" in rec["files"] and all(
      not f.startswith("digests.") for f in rec["files"])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
  got = ck.restore(1, target)
  np.testing.assert_array_equal(got["params"]["w"], _state()["params"]["w"])
  with open(step_dir / "_CHECKPOINT_METADATA", "a") as f:   # a file orbax does not check
    f.write(" ")
  with pytest.raises(checkpoint.CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
    ck.restore(1, target)
  ck.close()


def test_a_nonfinite_state_is_not_saved_unless_the_caller_vouches(tmp_path):
  from bigvl.train import checkpoint
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  bad = {"w": jnp.array([1.0, jnp.inf])}
  with pytest.raises(checkpoint.NonfiniteStateError, match="w"):
    ck.save(1, bad)
  assert ck.all_steps() == []
  ck.close()


def test_a_checkpoint_of_format_1_still_restores_and_is_verified(tmp_path):
  """bigvl before file digests wrote per-array fingerprints in verify/: such a run resumes, and
  damage to its arrays is still found."""
  from bigvl.train import checkpoint, verify
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  state = _state()
  ck.save(1, state)
  step_dir = tmp_path / "ck" / "1"
  os.remove(step_dir / "digests.process_0.json")
  with open(step_dir / "verify" / "metadata", "w") as f:
    json.dump({"format": checkpoint.VERIFY_FORMAT_ARRAYS, "process_count": 1,
               "arrays": verify.fingerprints(state)}, f)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  ck.restore(1, target)
  assert ck.verify_step(1, target) == []
  with open(step_dir / "verify" / "metadata", "w") as f:   # as if one array changed on disk
    prints = verify.fingerprints({**state, "params": {"w": state["params"]["w"] + 1}})
    json.dump({"format": checkpoint.VERIFY_FORMAT_ARRAYS, "process_count": 1,
               "arrays": prints}, f)
  assert "differ from what was saved" in ck.verify_step(1, target)[0]
  ck.close()
