"""Export a bigvl M²-Encoder to PyTorch, in the released checkpoint layout (also the towers of a
system built on them, such as SyCoCa's: configs/m2_sycoca_0p4b.py).

  python launch/export_torch.py --workdir=/tmp/bigvl_tiny --out=/tmp/bigvl_tiny_torch --check
  python launch/export_torch.py --workdir=DIR --step=400 --out=OUT

--workdir is a training workdir (its latest checkpoint, or --step) or a parameter directory written
by launch/import_torch.py. OUT receives

  model.safetensors   the state dict, with the released key names (loads strict=True into
                      bigvl.export.torch_m2.M2Encoder, sized by config.json, and into the
                      reference's VLMo module built with the same sizes: the reference builds its
                      module with 1024 text positions and the released sizes, so the export of a
                      model of other sizes, e.g. configs/m2_tiny.py's 64 text positions, loads
                      strictly there only after its config is changed to match config.json)
  config.json         sizes, text length, lower-casing and the tokenizer's file name
  <tokenizer>         a copy of the SentencePiece model

and is read back with `bigvl.export.torch_m2.load_exported(OUT)`. Weights released checkpoints hold
but bigvl does not train are written as bigvl.export.name_map describes.

--check also runs bigvl and the exported PyTorch model, in float32, on the same images and English
and Chinese texts and prints {"max_abs_diff": ...}: the largest difference over the image and text
embeddings (the zero-shot probabilities' difference is printed beside it).
"""

import dataclasses
import errno
import json
import logging as std_logging
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or bigvl parameter directory.")
_STEP = flags.DEFINE_integer("step", None, "Training checkpoint step (latest if unset).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_CHECK = flags.DEFINE_bool("check", False, "Compare bigvl and PyTorch embeddings after exporting.")
flags.mark_flags_as_required(["workdir", "out"])

FORMAT = "bigvl.torch_m2"
CHECK_TEXTS = (
    "a photo of a red circle",
    "two small blue squares on a white background",
    "A Dog Running   on the Beach.",
    "一只猫坐在草地上",
    "红色的圆形",
    "蓝色的正方形和绿色的三角形",
)
CHECK_IMAGES = 4


@dataclasses.dataclass
class Source:
  cfg: Any                    # bigvl.models.m2_encoder.M2Config
  tokenizer_file: str
  max_len: int
  lowercase: bool
  kept: dict
  subtree: str = ""           # where a system keeps the towers in its parameters ("": all of them)


def check_workdir(workdir: str, step: int | None) -> None:
  """Refuses, before any work, a --workdir that is neither a parameter directory nor a training
  run with a finished checkpoint (of --step) and its config.json."""
  from etils import epath
  from bigvl.export import params_io
  path = epath.Path(workdir)
  if params_io.is_params_dir(workdir):
    if step is not None:
      raise ValueError(f"{workdir} is a parameter directory; it has no steps: drop --step")
    return
  if not path.is_dir():
    raise FileNotFoundError(errno.ENOENT, "no such directory (give a training workdir or a "
                            "directory written by launch/import_torch.py)", workdir)
  if not (path / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir} has no checkpoints/ and is no parameter directory "
                            f"({params_io.PARAMS_DIR}/ and {params_io.CONFIG_FILE}): give a "
                            "training run's workdir or a directory written by "
                            "launch/import_torch.py")
  params_io.checkpoint_step(workdir, step)        # names what is missing
  if not (path / params_io.CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{workdir} has checkpoints but no {params_io.CONFIG_FILE}, which "
                            "says what model they hold (a run writes it when it starts)")


def _source(workdir: str) -> Source:
  """Model sizes and tokenizer of a parameter directory, or of a training run through its system."""
  import ml_collections
  from bigvl.export import params_io
  if params_io.is_params_dir(workdir):
    doc = params_io.read_config(workdir)
    tok = doc["tokenizer"]
    return Source(params_io.model_config(doc), os.path.join(workdir, tok["file"]), tok["max_len"],
                  tok["lowercase"], params_io.load_kept(workdir))
  config = ml_collections.ConfigDict(params_io.read_config(workdir))   # the run's config.json
  system = params_io.system_for(config, workdir)
  # The weights are float32 whatever the run computed in; the check compares in float32.
  cfg = dataclasses.replace(system.model_config(), dtype="float32")
  return Source(cfg, system.tokenizer.model_file, config.tokenizer.max_len,
                config.tokenizer.lowercase, {}, system.export_subtree)


def export(workdir: str, out: str, step: int | None = None) -> tuple[Source, dict]:
  """Writes OUT; returns the source and the bigvl parameters (for --check)."""
  import shutil

  import numpy as np
  import safetensors.numpy
  from bigvl.export import name_map, params_io
  from bigvl.export import torch_m2

  from bigvl import cli

  check_workdir(workdir, step)
  cli.check_writable(out, "--out")
  src = _source(workdir)
  params = params_io.load_params(workdir, params_io.abstract_params(src.cfg), step=step,
                                 subtree=src.subtree)
  state = name_map.to_torch(params, depth=src.cfg.depth, vl_depth=src.cfg.vl_depth,
                            extras=src.kept)
  os.makedirs(out, exist_ok=True)
  weights = os.path.join(out, torch_m2.WEIGHTS_FILE)
  with cli.needs_space(out, sum(v.nbytes for v in state.values()), "the export"):
    try:     # written beside, then renamed: a failed export leaves no half-written file
      safetensors.numpy.save_file(state, weights + ".tmp", metadata={"format": "pt"})
      os.replace(weights + ".tmp", weights)
    except BaseException:
      if os.path.exists(weights + ".tmp"):
        os.unlink(weights + ".tmp")
      raise
  tok_name = os.path.basename(src.tokenizer_file)
  shutil.copyfile(src.tokenizer_file, os.path.join(out, tok_name))
  doc = {
      "format": FORMAT,
      "model": params_io.model_json(src.cfg),
      "tokenizer": {"file": tok_name, "max_len": src.max_len, "lowercase": src.lowercase},
      "weights": torch_m2.WEIGHTS_FILE,
      "source": {"path": os.path.abspath(workdir),
                 "step": params_io.checkpoint_step(workdir, step)},
  }
  with open(os.path.join(out, torch_m2.CONFIG_FILE), "w") as f:
    json.dump(doc, f, indent=2)
  print(json.dumps({"out": out, "tensors": len(state),
                    "parameters": int(sum(np.prod(v.shape) for v in state.values()))}))
  return src, params


def check(src: Source, params: dict, out: str) -> dict:
  """Largest differences between bigvl and the exported PyTorch model on the same inputs."""
  import jax
  import numpy as np
  import torch
  from flax import nnx
  from bigvl.export import torch_m2
  from bigvl.models import m2_encoder
  from bigvl.models.layers import init as layer_init

  model, tokenizer = torch_m2.load_exported(out)
  size = src.cfg.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (CHECK_IMAGES, size, size, 3)).astype(np.float32)
  ids, mask = tokenizer.encode_batch(CHECK_TEXTS)

  graphdef = nnx.graphdef(layer_init.abstract(lambda rngs: m2_encoder.M2Encoder(src.cfg, rngs=rngs)))
  encode_image = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
  encode_text = jax.jit(lambda p, i, m: nnx.merge(graphdef, p).encode_text(i, m))
  # Full float32 matmuls: on TPUs the default precision passes through bfloat16.
  with jax.default_matmul_precision("highest"):
    img_j = np.asarray(encode_image(params, images))
    txt_j = np.asarray(encode_text(params, ids, mask))
  probs_j = np.asarray(jax.nn.softmax(np.exp(np.float32(params["logit_scale"])) * img_j @ txt_j.T))

  with torch.no_grad():
    img_t = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    txt_t = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    probs_t = model.zero_shot_probs(img_t, txt_t).numpy()
  img_d = float(np.abs(img_j - img_t.numpy()).max())
  txt_d = float(np.abs(txt_j - txt_t.numpy()).max())
  return {"max_abs_diff": max(img_d, txt_d), "image_max_abs_diff": img_d,
          "text_max_abs_diff": txt_d, "probs_max_abs_diff": float(np.abs(probs_j - probs_t).max()),
          "images": CHECK_IMAGES, "texts": len(CHECK_TEXTS)}


def main(argv):
  del argv
  std_logging.getLogger("absl").setLevel(std_logging.WARNING)   # Orbax's internals at INFO
  src, params = export(_WORKDIR.value, _OUT.value, _STEP.value)
  if _CHECK.value:
    print(json.dumps(check(src, params, _OUT.value)))


if __name__ == "__main__":
  from bigvl import cli  # noqa: E402
  cli.run_main(main, "export_torch.py")
