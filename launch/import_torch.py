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

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
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


def import_checkpoint(config, ckpt: str, out: str) -> dict:
  import jax
  from bigvl.export import name_map, params_io, torch_m2

  system = params_io.system_for(config)
  cfg = system.model_config()
  abstract = params_io.abstract_params(cfg)

  state = torch_m2.read_state_dict(ckpt)
  resized = None
  table = state.get(torch_m2.VISION_POSITIONS_KEY)
  if table is not None and table.ndim == 2 and table.shape[0] != cfg.vision_positions:
    resized = [int(table.shape[0]), cfg.vision_positions]
    state[torch_m2.VISION_POSITIONS_KEY] = torch_m2.resize_vision_positions(
        table, cfg.vision_positions)

  params, kept = name_map.from_torch(_to_numpy(state), depth=cfg.depth, vl_depth=cfg.vl_depth,
                                     shapes=abstract)
  params = jax.tree.map(lambda x, a: x.astype(a.dtype, copy=False), params, abstract)
  params_io.save_params(
      out, params,
      config_json={
          "model": params_io.model_json(cfg),
          "tokenizer": {"max_len": config.tokenizer.max_len,
                        "lowercase": config.tokenizer.lowercase},
          "source": {"ckpt": os.path.abspath(ckpt), "resized_vision_positions": resized},
      },
      tokenizer_file=system.tokenizer.model_file, kept=kept)
  return {"out": out, "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
          "kept_tensors": len(kept), "resized_vision_positions": resized}


def main(argv):
  del argv
  print(json.dumps(import_checkpoint(_CONFIG.value, _CKPT.value, _OUT.value)))


if __name__ == "__main__":
  app.run(main)
