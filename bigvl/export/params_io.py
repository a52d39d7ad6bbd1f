"""bigvl parameter directories: what import writes, and what eval and fine-tuning read.

A parameter directory holds

  params/          orbax checkpoint of the parameters (a pure-dict pytree)
  config.json      {"format": FORMAT, "model": {sizes}, "tokenizer": {"file", "max_len",
                    "lowercase"}, ...}
  <tokenizer>      a copy of the SentencePiece model named in config.json
  kept.npz         (optional) released-checkpoint tensors bigvl does not create, by PyTorch key,
                   kept so that export writes them back unchanged (see `name_map`)

`load_params` reads such a directory or a training workdir (`DIR/checkpoints/<step>/state`, of which
only `params` is read). Paths may be local or any filesystem etils.epath knows (gs://...).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from bigvl.models import m2_encoder
from bigvl.models.layers import init as layer_init



class CheckpointMismatchError(ValueError):
  """A checkpoint whose structure or shapes do not match the configured model."""


FORMAT = "bigvl.params"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
KEPT_FILE = "kept.npz"
# M2Config fields that describe the weights; dtype, param_dtype and remat are choices of each run.
MODEL_FIELDS = ("width", "heads", "depth", "vl_depth", "mlp_dim", "out_dim", "patch_size",
                "image_size", "vocab_size", "text_positions", "ln_eps")


def model_json(cfg: m2_encoder.M2Config) -> dict[str, Any]:
  return {f: getattr(cfg, f) for f in MODEL_FIELDS}


def model_config(doc: Mapping[str, Any], **runtime) -> m2_encoder.M2Config:
  """The M2Config of a config.json written here or by launch/export_torch.py."""
  model = dict(doc["model"])
  unknown = sorted(set(model) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"config.json model has unknown field(s) {unknown}")
  return m2_encoder.M2Config(**model, **runtime)


def system_for(config: Any, workdir: str | None = None) -> Any:
  """The config's system with the tokenizer of `workdir`'s run (or the config's) loaded, which
  fixes the vocabulary size. Reading or writing weights needs the tokenizer but not the training
  shards, which may live elsewhere (a bucket) when a run is exported."""
  from bigvl import systems
  from bigvl.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  system = systems.build(config, mesh, mesh_lib.config_rules(config))
  system.prepare_for_checkpoint(workdir or "")
  return system


def _epath(path: str | os.PathLike) -> epath.Path:
  # Orbax wants absolute local paths; remote ones (gs://...) are absolute already.
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def is_params_dir(path: str) -> bool:
  path = _epath(path)
  return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def read_config(path: str) -> dict[str, Any]:
  return json.loads((_epath(path) / CONFIG_FILE).read_text())


def save_params(out_dir: str, params: Mapping[str, Any], *, config_json: Mapping[str, Any],
                tokenizer_file: str, kept: Mapping[str, np.ndarray] | None = None) -> None:
  """Writes a parameter directory; `out_dir` must not hold one already.

  `config_json` must have "model" (see `model_json`) and "tokenizer" {"max_len", "lowercase"};
  the tokenizer's file name and the format marker are added here.
  """
  out_dir = _epath(out_dir)
  if (out_dir / PARAMS_DIR).exists():
    raise FileExistsError(f"{out_dir} already holds parameters; choose another directory")
  doc = json.loads(json.dumps(dict(config_json)))  # a deep copy that also proves it is JSON
  if "model" not in doc or "tokenizer" not in doc:
    raise ValueError("config_json needs 'model' and 'tokenizer' entries")
  doc["format"] = FORMAT
  tokenizer_file = _epath(tokenizer_file)
  doc["tokenizer"]["file"] = tokenizer_file.name
  out_dir.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out_dir / PARAMS_DIR, params)
  ckptr.wait_until_finished()
  ckptr.close()
  (out_dir / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
  if kept:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in kept.items()})
    (out_dir / KEPT_FILE).write_bytes(buf.getvalue())
  # Written last: a directory with a config.json is complete.
  (out_dir / CONFIG_FILE).write_text(json.dumps(doc, indent=2))


def load_kept(path: str) -> dict[str, np.ndarray]:
  """The kept checkpoint-only tensors of a parameter directory ({} when none or a workdir)."""
  file = _epath(path) / KEPT_FILE
  if not file.is_file():
    return {}
  with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _digit_keys_to_int(tree: Any) -> Any:
  # Without a target, orbax gives list indices back as strings; nnx.merge wants ints.
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _digit_keys_to_int(v)
            for k, v in tree.items()}
  return tree


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_shapes(saved: Any, abstract: Any, where: str) -> None:
  saved_leaves = {_path_str(p): v for p, v in
                  jax.tree_util.tree_leaves_with_path(_digit_keys_to_int(saved))}
  want_leaves = {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
  for name, want in want_leaves.items():
    got = saved_leaves.get(name)
    if got is None:
      raise CheckpointMismatchError(f"{where} has no parameter {name!r} (the model has it)")
    if tuple(got.shape) != tuple(want.shape):
      raise CheckpointMismatchError(f"{where}: parameter {name!r} has shape {tuple(got.shape)}, "
                                    f"the model wants {tuple(want.shape)}")
  extra = sorted(set(saved_leaves) - set(want_leaves))
  if extra:
    raise CheckpointMismatchError(f"{where} has parameter {extra[0]!r} that the model lacks "
                                  f"({len(extra)} such)")


def _target(abstract: Any) -> tuple[Any, Any]:
  """(item, restore_args): restore into `abstract`'s shapes, dtypes and shardings (if any)."""
  def args(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)
  return abstract, jax.tree.map(args, abstract)


def _as_numpy_args(tree: Any) -> Any:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def _latest_state_dir(workdir: epath.Path, step: int | None) -> tuple[epath.Path, int]:
  root = workdir / "checkpoints"
  # Orbax renames a step's directory into place once it is complete (unfinished ones have
  # suffixes) and writes its commit marker first; a step directory without one is incomplete.
  steps = sorted(int(d.name) for d in root.iterdir()
                 if d.name.isdigit() and (d / "state").is_dir()
                 and (d / "commit_success.txt").exists())
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {root}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {root} (steps: {steps})")
  return root / str(step) / "state", step


def checkpoint_step(path: str, step: int | None = None) -> int | None:
  """The step `load_params(path, step=step)` reads; None for a parameter directory."""
  if is_params_dir(path):
    return None
  return _latest_state_dir(_epath(path), step)[1]


def load_params(path: str, abstract_params: Any | None = None, *, step: int | None = None,
                subtree: str = "") -> Any:
  """Parameters (a pure dict) from a parameter directory or a training workdir.

  Args:
    path: a directory written by `save_params`, or a training workdir (its latest checkpoint, or
      `step`; only `params` is read, not the optimizer state).
    abstract_params: the model's parameters as jax.ShapeDtypeStruct (with shardings to restore
      sharded). Checked first: a missing, extra or differently shaped parameter raises
      `CheckpointMismatchError` naming it. Without it the arrays come back as NumPy, as saved.
    step: which training checkpoint; not allowed for a parameter directory.
    subtree: read only the parameters under this top-level key of a training checkpoint (a
      system's towers, e.g. "towers"); `abstract_params` is then that subtree's.
  """
  path = _epath(path)
  ckptr = ocp.PyTreeCheckpointer()
  if is_params_dir(path):
    if step is not None:
      raise ValueError(f"{path} is a parameter directory; it has no steps")
    directory, where, wrap = path / PARAMS_DIR, str(path), False
  elif (path / "checkpoints").is_dir():
    directory, step = _latest_state_dir(path, step)
    where, wrap = f"{path} step {step}", True
  else:
    raise FileNotFoundError(f"{path} is neither a bigvl parameter directory ({PARAMS_DIR}/ and "
                            f"{CONFIG_FILE}) nor a training workdir (checkpoints/)")

  saved = ckptr.metadata(directory).item_metadata.tree
  saved = saved["params"] if wrap else saved
  if subtree:
    if not wrap or subtree not in saved:
      raise CheckpointMismatchError(f"{where} holds no parameters under {subtree!r}")
    saved = saved[subtree]
  if abstract_params is not None:
    _check_shapes(saved, abstract_params, where)
    item, restore_args = _target(abstract_params)
  else:
    item, restore_args = saved, _as_numpy_args(saved)
  if subtree:
    item, restore_args = {subtree: item}, {subtree: restore_args}
  if wrap:
    item, restore_args = {"params": item}, {"params": restore_args}
  restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=wrap))
  ckptr.close()
  restored = restored["params"] if wrap else restored
  restored = restored[subtree] if subtree else restored
  return _digit_keys_to_int(restored) if abstract_params is None else restored


def _source_trees(path: epath.Path, step: int | None) -> list[tuple[epath.Path, bool, str]]:
  """(directory, wrapped in {"params": ...}, description) of every tree `path` holds parameters
  in: a parameter directory's `params/`, or a workdir's checkpoint plus its frozen weights."""
  if is_params_dir(path):
    if step is not None:
      raise ValueError(f"{path} is a parameter directory; it has no steps")
    return [(path / PARAMS_DIR, False, str(path))]
  if (path / "checkpoints").is_dir():
    directory, step = _latest_state_dir(path, step)
    out = [(directory, True, f"{path} step {step}")]
    if (path / FROZEN_DIR).is_dir():
      out.append((path / FROZEN_DIR, False, f"{path} frozen weights"))
    return out
  raise FileNotFoundError(f"{path} is neither a bigvl parameter directory ({PARAMS_DIR}/ and "
                          f"{CONFIG_FILE}) nor a training workdir (checkpoints/)")


FROZEN_DIR = "frozen"  # a workdir's frozen weights, saved once (bigvl.train.checkpoint.FrozenStore)


def _flat(tree: Any) -> dict[str, Any]:
  return {_path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_matching(path: str, abstract: Any, *, pattern: str = "", step: int | None = None,
                  into: str = "") -> tuple[dict[str, Any], dict[str, list[str]]]:
  """The parameters of `abstract` (ShapeDtypeStructs with shardings) that `path` holds, for
  starting a run from another one or from an imported checkpoint, perhaps only in part.

  `pattern` (a regex on "a/b/kernel" paths; "" = all) selects which of the model's parameters to
  take. Returns ({path: array} of what was loaded, report) where the report lists "loaded",
  "left_at_init" (the model's parameters not loaded) and "unused" (the source's parameters the
  model does not take). Raises CheckpointMismatchError listing every selected parameter whose
  shape differs, every parameter the pattern selects that the source lacks (when a pattern is
  given), or when nothing at all would be loaded.

  `into` (a top-level key of the model, e.g. "towers") loads the source into that subtree only: the
  model's "towers/a/b" takes the source's "a/b" (an M²-Encoder run into a system built on its
  towers), or its "towers/a/b" where the source has that (a run of another system on the same
  towers). The report names the model's paths.
  """
  import re
  root = _epath(path)
  want = _flat(abstract)
  select = re.compile(pattern) if pattern else None
  chosen = {k: v for k, v in want.items() if select is None or select.search(k)}
  if into:
    chosen = {k: v for k, v in chosen.items() if k.startswith(into + "/")}
  loaded: dict[str, Any] = {}
  seen: set[str] = set()
  mismatched = []
  ckptr = ocp.PyTreeCheckpointer()
  for directory, wrap, where in _source_trees(root, step):
    saved = ckptr.metadata(directory).item_metadata.tree
    saved = _digit_keys_to_int(saved["params"] if wrap else saved)
    flat = _flat(saved)
    # A bare source (an M²-Encoder run loaded `into` towers): its "a/b" is the model's "into/a/b".
    bare = bool(into) and not any(k.startswith(into + "/") for k in flat)
    if bare:
      saved, flat = {into: saved}, {f"{into}/{k}": v for k, v in flat.items()}
    seen |= set(flat)
    take = {k for k in chosen if k in flat and k not in loaded}
    mismatched += [f"{k}: {tuple(flat[k].shape)} in {where}, the model wants "
                   f"{tuple(chosen[k].shape)}" for k in sorted(take)
                   if tuple(flat[k].shape) != tuple(chosen[k].shape)]
    take = {k for k in take if tuple(flat[k].shape) == tuple(chosen[k].shape)}
    if not take or mismatched:
      continue
    # A partial restore of just these leaves, into the model's shardings.
    leaves = jax.tree_util.tree_leaves_with_path(saved)
    item = _nest({_path_str(p): chosen[_path_str(p)] for p, _ in leaves if _path_str(p) in take})
    item, restore_args = _target(item)
    if bare:
      item, restore_args = item[into], restore_args[into]
    if wrap:
      item, restore_args = {"params": item}, {"params": restore_args}
    restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    restored = restored["params"] if wrap else restored
    loaded.update(_flat({into: restored} if bare else restored))
  ckptr.close()
  if mismatched:
    raise CheckpointMismatchError(
        f"{path}: {len(mismatched)} parameter(s) of another shape: " + "; ".join(mismatched))
  missing = sorted(set(chosen) - set(loaded))
  if select is not None and missing:
    raise CheckpointMismatchError(
        f"{path} lacks {len(missing)} parameter(s) that init_from_pattern={pattern!r} selects, "
        f"e.g. {missing[:3]}")
  if not loaded:
    raise CheckpointMismatchError(f"{path} holds none of the model's parameters (it has e.g. "
                                  f"{sorted(seen)[:3]}): is it from another model?")
  report = {"loaded": sorted(loaded), "left_at_init": sorted(set(want) - set(loaded)),
            "unused": sorted(seen - set(want))}
  return loaded, report


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/0/kernel": x} → {"a": {"b": {0: {"kernel": x}}}} (digit keys as ints, as nnx has them)."""
  out: dict[Any, Any] = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = [int(k) if k.isdigit() else k for k in key.split("/")]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def abstract_params(cfg: m2_encoder.M2Config) -> Any:
  """The parameters of an M2Encoder of `cfg` as jax.ShapeDtypeStruct (nothing is allocated)."""
  model = layer_init.abstract(lambda rngs: m2_encoder.M2Encoder(cfg, rngs=rngs))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))

