"""The keys every training config has, and their validation.

Config files in `configs/` call `base_config()` and change what they need. The returned ConfigDict is
locked: a misspelt key, in the file or on the command line (`--config.batch_sise=8`), is an error at
load time rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
import glob
import math
import os

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.system = "m2_encoder"         # a key of bigvl.systems.SYSTEMS
  c.seed = 0
  c.batch_size = 128              # global, over all processes and devices
  c.total_steps = 1000
  c.checkpoint_every = 250        # also saved at the end
  c.keep_checkpoints = 3
  c.log_every = 20
  c.max_nonfinite_in_a_row = 10   # updates with a non-finite loss or gradient are skipped; this many
                                  # in a row stop the run (0: never stop)
  c.init_from = ""                # a workdir or a params dir (launch/import_torch.py) to start from

  # Mesh axis sizes (-1: all remaining devices), in device-order, and the logical-axis rules.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = config_dict.placeholder(tuple)  # None: bigvl.parallel.mesh.DEFAULT_RULES
  # Parameters of at least this many bytes must be sharded along `fsdp` when it has more than one
  # device (bigvl.parallel.guard); the run fails before compiling otherwise. 0: no check.
  c.sharding_guard_min_bytes = 1 << 20

  c.model = ml_collections.ConfigDict(dict(
      variant="tiny",             # a key of bigvl.models.m2_encoder.VARIANTS
      # Any field left None takes the variant's value.
      width=config_dict.placeholder(int),
      heads=config_dict.placeholder(int),
      depth=config_dict.placeholder(int),
      vl_depth=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int),
      out_dim=config_dict.placeholder(int),
      patch_size=config_dict.placeholder(int),
      image_size=config_dict.placeholder(int),
      text_positions=config_dict.placeholder(int),
      init_std=config_dict.placeholder(float),
      dtype="float32",            # compute dtype of matmuls and activations ("bfloat16": mixed
                                  # precision; LayerNorm, softmax and loss statistics stay float32)
      param_dtype="float32",      # parameters (and so the optimizer state)
      attention="xla",            # a key of bigvl.models.multiway.ATTENTION ("cudnn" on GPUs)
      remat=False,                # rematerialise each layer in the backward pass ...
      remat_policy="full",        # ... keeping a key of bigvl.models.multiway.REMAT_POLICIES
      scan_layers=False,          # each stack as one lax.scan: compile time flat in depth
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.05,
      b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0))

  c.loss = ml_collections.ConfigDict(dict(
      logit_scale_max=math.log(100.0),  # CLIP's clamp of the learned temperature
      impl="ring",                # "ring" (sharded, all-gather-free) or "dense" (exact oracle)
      group_size=0,               # devices per contrastive group of the ring loss; 0 = all (exact)
      accum_steps=1,              # GradCache micro-batches per step (same result, 1/K activations)
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",                    # "": the embedded world's tokenizer (built with the data)
      max_len=52,
      lowercase=True,
  ))

  c.data = ml_collections.ConfigDict(dict(
      kind="synthetic_world",     # or "shards"
      dir="",                     # synthetic_world: "" = $BIGVL_DATA_DIR or ~/.cache/bigvl/...
      train_files="",             # shards: a glob of ArrayRecord files made by launch/build_shards.py
      worker_count=0,             # grain worker processes per host
      max_skip_fraction=0.05,     # bad records (or unreadable shards) above this share: stop
      world=ml_collections.ConfigDict(dict(
          seed=0, num_train=60000, num_eval=1200, num_shards=8, vocab_size=384)),
  ))

  # Evaluations (keys: eval_config), on the embedded world's held-out combinations.
  # classes="split": the candidates are the classes of the split (for eval_heldout, only
  # combinations never trained on: the zero-shot protocol); "all": every class of the world,
  # seen ones included (the generalised protocol, where memorised pairs compete).
  c.evals = ml_collections.ConfigDict(dict(
      zeroshot=eval_config(kind="zeroshot", classes="split"),
      zeroshot_all=eval_config(kind="zeroshot", classes="all"),
      retrieval=eval_config(kind="retrieval"),
  ))
  return c


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """One entry of `config.evals` (bigvl/evaluators/build.py builds it); any name may hold one."""
  c = ml_collections.ConfigDict(dict(
      kind="",                    # "zeroshot" or "retrieval" ("": from the entry's name)
      every=0,                    # steps between runs during training (0: only at the end)
      batch_size=256,             # global, over all processes (rounded up to the device count)
      source="world",             # "world" | "tfds:NAME" | "jsonl:PATH" | "" (off)
      split="eval_heldout",       # the world's split, or the TFDS split ("validation", "test")
      data_dir="",                # TFDS data_dir (local or gs://); jsonl: image root ("": its folder)
      max_examples=0,             # only the first N images (0: all)
      classes="split",            # world zero-shot: the split's classes or "all" of the world's
      classnames="",              # zero-shot: "" = the source's; a file, or "en:FILE,zh:FILE"
      templates="",               # zero-shot: "clip", "simple" or a JSON file ("": the world's own
                                  # for the world, else "clip")
      langs="",                   # zero-shot languages, e.g. "zh" ("": all that have class names)
      image_key="image",          # TFDS feature names
      label_key="label",
      caption_key="captions/text",
  ))
  c.update(overrides)
  return c


def pretrain_on_shards(variant: str, batch_size: int) -> ml_collections.ConfigDict:
  """M²-Encoder contrastive pretraining of a released size on shards from launch/build_shards.py.

  The run needs `data.train_files` and `tokenizer.path` (the GLM SentencePiece model) on the
  command line; validation says so otherwise.
  """
  c = base_config()
  c.model.variant = variant
  c.batch_size = batch_size
  c.total_steps = 100_000
  c.checkpoint_every = 1000
  c.log_every = 50
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 2000
  c.data.kind = "shards"
  c.data.worker_count = 8
  # Pod defaults (launch/plan.py shows the fit per slice): parameters and optimizer state sharded
  # over every chip, bfloat16 compute with float32 parameters, each stack one scanned and
  # rematerialised layer (compile time flat in depth, activations of one layer at a time).
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = True
  # The paper's benchmarks, off until given data (shared/docs/m2_encoder.md has the protocol), e.g.
  #   --config.evals.flickr30k_cn.source=jsonl:/data/f30k-cn_test.jsonl
  #   --config.evals.imagenet.source=tfds:imagenet2012 --config.evals.imagenet.data_dir=DIR
  #   --config.evals.imagenet.classnames=en:imagenet_en.txt
  c.evals = ml_collections.ConfigDict(dict(
      imagenet=eval_config(kind="zeroshot", source="", split="validation", langs="en"),
      imagenet_cn=eval_config(kind="zeroshot", source="", split="validation", langs="zh"),
      flickr30k=eval_config(kind="retrieval", source="", split="test"),
      flickr30k_cn=eval_config(kind="retrieval", source="", split="test"),
      coco=eval_config(kind="retrieval", source="", split="test"),
      coco_cn=eval_config(kind="retrieval", source="", split="test"),
  ))
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


def _leaf_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _leaf_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _is_local(path: str) -> bool:
  return "://" not in path  # gs://… and other remote paths are checked when they are opened


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int = 1) -> None:
  """Checks run before anything is built or compiled; with `num_devices` also the mesh and batch.

  Each failure is a ConfigError whose one-line message says what to change.
  """
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  # Eval entries have free names (evals.imagenet, evals.coco_cn), each with eval_config's keys.
  known = [k for k in _leaf_keys(base_config()) if not k.startswith("evals.")]
  known += [f"evals.{name}.{k}" for name in c.evals for k in eval_config()]
  for key in _leaf_keys(c):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      raise ConfigError(f"unknown config key {key!r}" +
                        (f" (did you mean {close[0]!r}?)" if close else "") +
                        ": fix or remove it")
  need(c.batch_size > 0, f"batch_size={c.batch_size}: must be positive")
  need(c.total_steps > 0, f"total_steps={c.total_steps}: must be positive")
  need(c.checkpoint_every > 0, f"checkpoint_every={c.checkpoint_every}: must be positive")
  need(c.log_every > 0, f"log_every={c.log_every}: must be positive")
  need(c.data.kind in ("synthetic_world", "shards"),
       f"data.kind={c.data.kind!r}: use 'synthetic_world' or 'shards'")
  if c.data.kind == "shards":
    need(bool(c.data.train_files), "data.kind='shards' needs data.train_files (a glob of shards)")
    need(bool(c.tokenizer.path), "data.kind='shards' needs tokenizer.path (a SentencePiece model)")
    need(not _is_local(c.data.train_files) or bool(glob.glob(c.data.train_files)),
         f"data.train_files={c.data.train_files!r} matches no file: point it at the shards "
         "written by launch/build_shards.py")
  need(not c.tokenizer.path or not _is_local(c.tokenizer.path) or os.path.isfile(c.tokenizer.path),
       f"tokenizer.path={c.tokenizer.path!r} does not exist: point it at a SentencePiece model")
  need(not c.init_from or not _is_local(c.init_from) or os.path.isdir(c.init_from),
       f"init_from={c.init_from!r} does not exist: point it at a workdir or a parameter directory")
  need(0.0 <= c.data.max_skip_fraction <= 1.0,
       f"data.max_skip_fraction={c.data.max_skip_fraction}: must be in [0, 1] (1: never stop)")
  need(c.max_nonfinite_in_a_row >= 0,
       f"max_nonfinite_in_a_row={c.max_nonfinite_in_a_row}: must be >= 0 (0: never stop)")
  need(c.loss.impl in ("ring", "dense"), f"loss.impl={c.loss.impl!r}: use 'ring' or 'dense'")
  for key in ("dtype", "param_dtype"):
    need(c.model[key] in ("float32", "bfloat16", "float16"),
         f"model.{key}={c.model[key]!r}: use 'float32', 'bfloat16' or 'float16'")
  from bigvl.models import multiway  # imports jax, which starts no backend
  need(c.model.attention in multiway.ATTENTION,
       f"model.attention={c.model.attention!r}: use one of {sorted(multiway.ATTENTION)}")
  need(c.model.attention != "cudnn" or c.model.dtype in ("bfloat16", "float16"),
       "model.attention='cudnn' needs model.dtype='bfloat16' (or 'float16')")
  need(c.model.remat_policy in multiway.REMAT_POLICIES,
       f"model.remat_policy={c.model.remat_policy!r}: use one of {sorted(multiway.REMAT_POLICIES)}")
  need(c.sharding_guard_min_bytes >= 0,
       f"sharding_guard_min_bytes={c.sharding_guard_min_bytes}: must be >= 0 (0: no check)")
  need(c.loss.impl == "ring" or c.loss.group_size == 0,
       "loss.group_size needs loss.impl='ring' (the dense loss is global)")
  need(c.loss.accum_steps >= 1, f"loss.accum_steps={c.loss.accum_steps}: must be >= 1")
  need(c.loss.group_size >= 0, f"loss.group_size={c.loss.group_size}: 0 (all devices) or a divisor "
       "of the number of batch shards")
  for name, ev in c.evals.items():
    _validate_eval(name, ev, c, need)
  if num_devices is not None:
    _validate_mesh(c, num_devices, num_processes)


def _validate_eval(name: str, ev: ml_collections.ConfigDict, c: ml_collections.ConfigDict,
                   need) -> None:
  from bigvl.evaluators import build
  need(ev.every >= 0, f"evals.{name}.every={ev.every}: must be >= 0")
  need(ev.batch_size > 0, f"evals.{name}.batch_size={ev.batch_size}: must be positive")
  if not ev.source:
    return  # off
  try:
    build.kind_of(name, ev)
    where_kind, where = build.parse_source(ev.source)
  except ValueError as e:
    raise ConfigError(f"evals.{name}: {e}") from None
  need(where_kind != "world" or c.data.kind == "synthetic_world",
       f"evals.{name}.source='world' needs data.kind='synthetic_world': give it a tfds: or jsonl: "
       "source, or set source='' to turn it off")
  need(where_kind != "jsonl" or os.path.isfile(where),
       f"evals.{name}.source={ev.source!r}: no such file")
  need(ev.classes in ("split", "all"), f"evals.{name}.classes={ev.classes!r}: 'split' or 'all'")
  need(ev.max_examples >= 0, f"evals.{name}.max_examples={ev.max_examples}: must be >= 0")


def _validate_mesh(c: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """The mesh fits the devices and the global batch splits over its data-parallel axes."""
  from bigvl.parallel import mesh as mesh_lib  # jax: only when devices are known
  axes = dict(c.mesh)
  flags = " × ".join(f"mesh.{a}" for a in axes)
  if list(axes.values()).count(-1) > 1:
    raise ConfigError(f"mesh {axes}: at most one axis may be -1 (the remaining devices)")
  known = math.prod(v for v in axes.values() if v != -1)
  if -1 in axes.values() and (known <= 0 or num_devices % known):
    raise ConfigError(
        f"mesh {axes}: the fixed axes need {known} devices, which does not divide the {num_devices} "
        f"devices: make the axes other than -1 multiply to a divisor of {num_devices}")
  if -1 not in axes.values() and known != num_devices:
    raise ConfigError(
        f"mesh {axes} needs {known} devices, there are {num_devices}: make {flags} multiply to "
        f"{num_devices}, or set one of them to -1")
  sizes = {a: (num_devices // known if v == -1 else v) for a, v in axes.items()}
  rules = dict(c.sharding_rules or mesh_lib.DEFAULT_RULES)
  batch_axes = rules.get("batch") or ()
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  dp = math.prod(sizes.get(a, 1) for a in batch_axes)
  unit = math.lcm(dp * c.loss.accum_steps, num_processes)
  if c.batch_size % unit:
    lower = c.batch_size // unit * unit
    raise ConfigError(
        f"batch_size={c.batch_size} must be a multiple of {unit} (the data-parallel size {dp} over "
        f"{' × '.join(batch_axes) or 'no mesh axis'} × loss.accum_steps={c.loss.accum_steps}, and "
        f"of the process count {num_processes}): use e.g. "
        + (f"{lower} or {lower + unit}" if lower else f"{unit}"))


def flags_parser(argv: list[str]) -> list[str]:
  """For `app.run(main, flags_parser=config_lib.flags_parser)`: absl's parser, but a --config.<key>
  the config lacks is a one-line error (exit 1) instead of ml_collections' chained traceback."""
  import sys
  from absl import app
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # what config_flags raises for an unknown key
    while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    key, _, hint = str(e.args[0] if e.args else e).partition("\n")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    sys.exit(f"{os.path.basename(argv[0])}: ConfigError: unknown config key {key}{hint}: fix or "
             "remove it")
