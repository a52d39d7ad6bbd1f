"""Import a PyTorch M²-Encoder checkpoint (released, or written by export_torch.py) into bigvl.

  python launch/import_torch.py --ckpt=m2_encoder_0.4B.ckpt --config=configs/m2_0p4b.py \
      --config.tokenizer.path=/path/to/glm_chinese_sp.model --out=/tmp/m2_0p4b
  python launch/import_torch.py --ckpt=OUT/model.safetensors --config=configs/m2_tiny.py --out=DIR

The file may hold a raw state dict, or one nested under `state_dict` (Lightning), `module`
(DeepSpeed) or `model`, with or without the `_forward_module.` key prefix. .safetensors files are
read directly; anything else with torch.load(weights_only=True), so a file that needs code to
unpickle is refused and nothing in it runs.

The model's sizes come from --config (command-line overrides included) and its tokenizer. Every key
of the released layout must be present and nothing else (`visual_tokenizer.*` of Lightning
training checkpoints is dropped); a missing or unexpected key, or a tensor of the wrong shape, is an
error that names it. A vision position table made for another image size is resized as the
reference's loader does (bigvl.export.torch_m2.resize_vision_positions).

DIR is a bigvl parameter directory (bigvl.export.params_io): launch/eval.py and fine-tuning
(--config.init_from=DIR) read it, and export_torch.py --workdir=DIR writes the same file back.
"""

import errno
import json
import logging as std_logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config naming the model.",
                                          lock_config=True)
_CKPT = flags.DEFINE_string("ckpt", None, "PyTorch checkpoint (.ckpt/.pt/.pth/.bin/.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output bigvl parameter directory (must not exist yet).")
flags.mark_flags_as_required(["config", "ckpt", "out"])


def _to_numpy(state):
  import torch
  out = {}
  for key, value in state.items():
    value = value.detach().cpu()
    # NumPy has no bfloat16; float32 holds every bfloat16 value exactly.
    out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return out


def check_out(out: str) -> None:
  """Refuses, before any work, an --out that holds parameters already or cannot be written."""
  from bigvl.export import params_io
  from bigvl import cli
  if "://" not in out and os.path.exists(os.path.join(out, params_io.PARAMS_DIR)):
    raise FileExistsError(errno.EEXIST, "holds parameters already: choose another --out", out)
  cli.check_writable(out, "--out")


def _remove(path: str) -> None:
  # A failed save's last writer threads may still create files for a moment.
  for _ in range(20):
    shutil.rmtree(path, ignore_errors=True)
    time.sleep(0.05)
    if not os.path.exists(path):
      return


def import_checkpoint(config, ckpt: str, out: str) -> dict:
  import jax
  from bigvl.export import name_map, params_io, torch_m2
  from bigvl import cli

  check_out(out)
  state = torch_m2.read_state_dict(ckpt)
  system = params_io.system_for(config)
  cfg = system.model_config()
  abstract = params_io.abstract_params(cfg)

  resized = None
  table = state.get(torch_m2.VISION_POSITIONS_KEY)
  if table is not None and table.ndim == 2 and table.shape[0] != cfg.vision_positions:
    resized = [int(table.shape[0]), cfg.vision_positions]
    state[torch_m2.VISION_POSITIONS_KEY] = torch_m2.resize_vision_positions(
        table, cfg.vision_positions)

  params, kept = name_map.from_torch(_to_numpy(state), depth=cfg.depth, vl_depth=cfg.vl_depth,
                                     shapes=abstract)
  params = jax.tree.map(lambda x, a: x.astype(a.dtype, copy=False), params, abstract)
  nbytes = sum(x.nbytes for x in jax.tree.leaves((params, kept)))
  created = "://" not in out and not os.path.exists(out)
  with cli.needs_space(out, nbytes, "the import"):
    try:
      params_io.save_params(
          out, params,
          config_json={
              "model": params_io.model_json(cfg),
              "tokenizer": {"max_len": config.tokenizer.max_len,
                            "lowercase": config.tokenizer.lowercase},
              "source": {"ckpt": os.path.abspath(ckpt), "resized_vision_positions": resized},
          },
          tokenizer_file=system.tokenizer.model_file, kept=kept)
    except BaseException:
      if created:                      # no half-written directory left behind
        _remove(out)
      raise
  return {"out": out, "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
          "kept_tensors": len(kept), "resized_vision_positions": resized}


def main(argv):
  del argv
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)   # Orbax's internals at INFO
  print(json.dumps(import_checkpoint(_CONFIG.value, _CKPT.value, _OUT.value)))


if __name__ == "__main__":
  from bigvl import cli  # noqa: E402
  cli.run_main(main, "import_torch.py")
