"""The keys every training config has, and their validation.

Config files in `configs/` call `base_config()` and change what they need. The returned ConfigDict is
locked: a misspelt key, in the file or on the command line (`--config.batch_sise=8`), is an error at
load time rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """The loop's keys. A system's `default_config()` adds its own (`full_config`)."""
  c = ml_collections.ConfigDict()
  c.system = ""                   # a key of bigvl.systems.SYSTEMS
  c.seed = 0                      # initialisation, data order and the per-step random key
  c.batch_size = 128              # global, over all processes and devices
  c.total_steps = 1000
  c.checkpoint_every = 250        # also saved at the end
  c.keep_checkpoints = 3
  c.log_every = 20
  c.max_nonfinite_in_a_row = 10   # updates with a non-finite loss or gradient are skipped; this many
                                  # in a row stop the run (0: never stop)
  c.init_from = ""                # a workdir or a params dir (launch/import_torch.py) to start from
  c.init_from_pattern = ""        # only the parameters whose path ("a/b/kernel") matches this regex
                                  # ("": every parameter the source has); the rest keep their init
  c.init_from_into = ""           # a top-level key of the model the source is loaded into (e.g.
                                  # "towers": a run of the bare towers into a system built on them)

  # Mesh axis sizes (-1: all remaining devices), in device-order, and the logical-axis rules.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = config_dict.placeholder(tuple)  # None: bigvl.parallel.mesh.DEFAULT_RULES
  # Parameters of at least this many bytes must be sharded along `fsdp` when it has more than one
  # device (bigvl.parallel.guard); the run fails before compiling otherwise. 0: no check.
  c.sharding_guard_min_bytes = 1 << 20

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.05,
      b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0))

  c.data = ml_collections.ConfigDict(dict(
      worker_count=0,             # grain worker processes per host
      max_skip_fraction=0.05,     # bad records (or unreadable shards) above this share: stop
      max_open_shards=64,         # shard readers open at once per process (least recently used closed)
  ))

  # Evaluations by name, each an entry of bigvl.evaluators.kinds.eval_config (its `every` is the
  # schedule: steps between runs, 0 = only at the end). The system's default_config adds them.
  c.evals = ml_collections.ConfigDict()
  return c


def merge_defaults(base: ml_collections.ConfigDict, extra: ml_collections.ConfigDict) -> None:
  """Adds `extra`'s keys to `base` (recursively), its values winning: a system's defaults."""
  for k, v in extra.items():
    if isinstance(v, ml_collections.ConfigDict) and isinstance(base.get(k),
                                                              ml_collections.ConfigDict):
      merge_defaults(base[k], v)
    else:
      base[k] = v


def full_config(system: str) -> ml_collections.ConfigDict:
  """The loop's keys with `system`'s own (unlocked): what a config file starts from."""
  from bigvl import systems  # systems import this module: the table only when asked for
  c = base_config()
  merge_defaults(c, systems.get(system).default_config())
  c.system = system
  return c


def set_dotted(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets {"optim.lr": 1e-3, ...} on `c` (as --config.optim.lr=1e-3 would); returns `c`."""
  for key, v in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
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


def accum_steps(c: ml_collections.ConfigDict) -> int:
  """Micro-batches per step: the system's `loss.accum_steps` where it has one."""
  loss = c.get("loss")
  return int(loss.get("accum_steps", 1)) if isinstance(loss, ml_collections.ConfigDict) else 1


def check_known_keys(c: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """A key that `defaults` lacks is a one-line error with the closest known key."""
  from bigvl.evaluators import kinds
  # Eval entries have free names (evals.val, evals.val_cn), each with the keys of its kind.
  known = [k for k in _leaf_keys(defaults) if not k.startswith("evals.")]
  for name, ev in c.evals.items():
    try:
      keys = kinds.entry_keys(kinds.kind_of(name, ev))
    except ValueError:
      keys = list(kinds.eval_config())  # the kind itself is reported by the entry's validation
    known += [f"evals.{name}.{k}" for k in keys]
  for key in _leaf_keys(c):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      raise ConfigError(f"unknown config key {key!r}" +
                        (f" (did you mean {close[0]!r}?)" if close else "") +
                        ": fix or remove it")


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int = 1, check_paths: bool = True, training: bool = True) -> None:
  """Checks run before anything is built or compiled: unknown keys, the loop's keys, then the
  system's own (`System.validate`); with `num_devices` also the mesh and batch. `check_paths=False`
  skips the existence of local files (planning on a machine without the data).

  Each failure is a ConfigError whose one-line message says what to change.
  """
  from bigvl import systems
  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)
  try:
    system = systems.get(c.get("system", ""))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_known_keys(c, full_config(c.system))
  need(c.batch_size > 0, f"batch_size={c.batch_size}: must be positive")
  need(c.total_steps > 0, f"total_steps={c.total_steps}: must be positive")
  need(c.checkpoint_every > 0, f"checkpoint_every={c.checkpoint_every}: must be positive")
  need(c.log_every > 0, f"log_every={c.log_every}: must be positive")
  need(not check_paths or not c.init_from or not _is_local(c.init_from)
       or os.path.isdir(c.init_from),
       f"init_from={c.init_from!r} does not exist: point it at a workdir or a parameter directory")
  try:
    re.compile(c.init_from_pattern)
  except re.error as e:
    raise ConfigError(f"init_from_pattern={c.init_from_pattern!r} is not a regex: {e}") from None
  need(0.0 <= c.data.max_skip_fraction <= 1.0,
       f"data.max_skip_fraction={c.data.max_skip_fraction}: must be in [0, 1] (1: never stop)")
  need(c.data.worker_count >= 0, f"data.worker_count={c.data.worker_count}: must be >= 0")
  need(c.data.max_open_shards >= 1,
       f"data.max_open_shards={c.data.max_open_shards}: must be >= 1")
  need(c.max_nonfinite_in_a_row >= 0,
       f"max_nonfinite_in_a_row={c.max_nonfinite_in_a_row}: must be >= 0 (0: never stop)")
  need(c.sharding_guard_min_bytes >= 0,
       f"sharding_guard_min_bytes={c.sharding_guard_min_bytes}: must be >= 0 (0: no check)")
  need(accum_steps(c) >= 1, f"loss.accum_steps={accum_steps(c)}: must be >= 1")
  for name, ev in c.evals.items():
    need(ev.every >= 0, f"evals.{name}.every={ev.every}: must be >= 0")
    need(ev.batch_size > 0, f"evals.{name}.batch_size={ev.batch_size}: must be positive")
  system.validate(c, check_paths=check_paths, training=training)
  if num_devices is not None:
    _validate_mesh(c, num_devices, num_processes)


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
  rules = mesh_lib.config_rules(c)
  batch_axes = mesh_lib.batch_axes(rules)
  dp = mesh_lib.data_parallel_size(sizes, rules)
  accum = accum_steps(c)
  unit = math.lcm(dp * accum, num_processes)
  if c.batch_size % unit:
    lower = c.batch_size // unit * unit
    raise ConfigError(
        f"batch_size={c.batch_size} must be a multiple of {unit} (the data-parallel size {dp} over "
        f"{' × '.join(batch_axes) or 'no mesh axis'} × accum_steps={accum}, and "
        f"of the process count {num_processes}): use e.g. "
        + (f"{lower} or {lower + unit}" if lower else f"{unit}"))


_NEW_EVAL = re.compile(r"--config\.evals\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)=(.*)",
                       re.S)


def _config_file_evals(argv: list[str]) -> set[str] | None:
  """The eval names of the --config file in `argv` (None when it cannot be read here: the normal
  parse then reports it)."""
  import importlib.util
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_bigvl_config_probe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config(arg) if arg else module.get_config()
    return set(c.evals) if "evals" in c else set()
  except Exception:  # noqa: BLE001 (reported by the real parse)
    return None


def _typed(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"{value!r} is not a bool")
    return value.lower() in ("true", "1")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def add_new_evals(config: ml_collections.ConfigDict,
                  entries: dict[str, dict[str, str]]) -> None:
  """Adds the user-defined eval entries given on the command line (`--config.evals.mine.source=
  jsonl:FILE --config.evals.mine.kind=retrieval`): each made by `eval_config` of its kind (or of
  the kind its name gives), its keys typed as their defaults. An unknown key is a one-line error."""
  from bigvl.evaluators import kinds
  with config.unlocked():
    for name, values in entries.items():
      try:
        kind = kinds.kind_of(name, values)
      except ValueError as e:
        raise ConfigError(f"--config.evals.{name}: a new eval entry: {e}") from None
      entry = kinds.eval_config(kind=kind)
      for key, raw in values.items():
        if key not in entry:
          raise ConfigError(f"unknown config key 'evals.{name}.{key}' (an entry of kind {kind!r} "
                            f"has {kinds.entry_keys(kind)}): fix or remove it")
        try:
          entry[key] = _typed(raw, entry[key])
        except (ValueError, ConfigError) as e:
          raise ConfigError(f"--config.evals.{name}.{key}={raw!r}: {e}") from None
      config.evals[name] = entry


_PENDING_EVALS: dict[str, dict[str, str]] = {}


def take_new_evals(argv: list[str]) -> None:
  """Removes from `argv` (in place) each `--config.evals.NAME.KEY=VALUE` whose NAME the --config
  file lacks, for `flags_parser` to add as a new eval entry (`add_new_evals`). Called by a launcher
  before it defines its flags: ml_collections' config flag reads its overrides from sys.argv when
  it is defined, and refuses a key the file lacks."""
  known = _config_file_evals(argv)
  if known is None:
    return
  keep = []
  for a in argv:
    m = _NEW_EVAL.fullmatch(a)
    if m and m.group(1) not in known:
      _PENDING_EVALS.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
    else:
      keep.append(a)
  argv[:] = keep


def flags_parser(argv: list[str]) -> list[str]:
  """For `app.run(main, flags_parser=config_lib.flags_parser)`: absl's parser, but a --config.<key>
  the config lacks is a one-line error (exit 1) instead of ml_collections' chained traceback, and
  the new eval entries `take_new_evals` took from the command line are added to the config."""
  import sys
  from absl import app, flags
  try:
    out = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # what config_flags raises for an unknown key
    while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    key, _, hint = str(e.args[0] if e.args else e).partition("\n")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    sys.exit(f"{os.path.basename(argv[0])}: ConfigError: unknown config key {key}{hint}: fix or "
             "remove it")
  if _PENDING_EVALS:
    try:
      add_new_evals(flags.FLAGS["config"].value, _PENDING_EVALS)
    except ConfigError as e:
      sys.exit(f"{os.path.basename(argv[0])}: ConfigError: {e}")
  return out
