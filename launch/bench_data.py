"""Images/s per CPU core of the training input pipeline, on photo-like JPEG shards it makes itself.

  python launch/bench_data.py --json=/tmp/bench_data.json                 # 1..cores workers
  python launch/bench_data.py --workers=1,2,4,8 --decoders=simplejpeg,pil --num_images=4000

The stream is `bigvl.data.formats.image_text.train_dataset`, the one training reads: ArrayRecord
read, msgpack parse, JPEG decode (draft mode: reduced-size decoding), bicubic resize to
--image_size (--resize: OpenCV's, the default, or PIL's), tokenise, batch (uint8: the model normalises on the device), through `--workers` grain worker processes (0: in this process). The
shards hold --num_images photo-like JPEGs (--width × --height, smooth multi-scale texture plus grain,
quality 90; ≈ 60 kB at 500×375, like web photos) with English and Chinese captions.

Per worker count and JPEG decoder ("simplejpeg": libjpeg-turbo's M/8 scales; "pil": PIL's draft
mode, 1/2 1/4 1/8 only) it reports images/s and images per CPU-second of all the processes
(this one and its workers) over the timed batches. The CPU-seconds figure is the "per core" one:
unlike images/s ÷ cores it stays right when the machine is shared or has fewer cores than workers.

It ends with an estimate of how many such cores one H100 training M²-Encoder-0.4B would consume:
the analytic FLOPs per sample (bigvl.systems.m2_encoder.flops) at an MFU (--h100_mfu: what a
published CLIP run reaches on H100s, and the GPU issue's target of 45%) and the H100's dense bf16
peak give the samples/s to feed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DECODERS = ("simplejpeg", "pil")
RESIZERS = ("cv2", "pil")
_EN = ("a", "the", "small", "red", "old", "wooden", "house", "near", "river", "dog", "running",
       "on", "grass", "with", "two", "children", "and", "blue", "sky", "over", "city", "street",
       "at", "night", "people", "walking", "beach", "sunset", "mountain", "lake", "car", "bicycle")
_ZH = ("一只", "小狗", "在", "草地", "上", "奔跑", "蓝色", "天空", "下", "城市", "街道", "夜晚",
       "两个", "孩子", "海边", "日落", "山", "湖", "旁边", "红色", "房子", "自行车", "人们", "散步")


# ---------------------------------------------------------------------------- shards
def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A JPEG whose spectrum looks like a photo's: smooth shapes at several scales plus sensor grain.

  Pure noise would be far harder to decode (every coefficient set) and a flat image far easier.
  """
  from PIL import Image
  img = np.zeros((height, width, 3), np.float32)
  for cells, amplitude in ((3, 70.0), (12, 35.0), (48, 15.0)):
    coarse = rng.normal(0, 1, (max(2, cells * height // width), cells, 3))
    coarse = ((coarse * 40 + 128).clip(0, 255)).astype(np.uint8)
    up = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    img += (up.astype(np.float32) - 128) * (amplitude / 40)
  img += rng.normal(0, 4, img.shape) + 128
  buf = io.BytesIO()
  Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
  if rng.random() < 0.5:
    return " ".join(rng.choice(_EN, rng.integers(8, 20)))
  return "".join(rng.choice(_ZH, rng.integers(6, 16)))


def make_shards(out_dir: str, num_images: int, width: int, height: int, num_shards: int = 4,
                seed: int = 0) -> list[str]:
  """Writes (once: reused when present) `num_shards` ArrayRecord shards of photo-like records."""
  from bigvl.data.formats import records
  from data_pipelines import shard_writer
  os.makedirs(out_dir, exist_ok=True)
  files = [os.path.join(out_dir, f"bench-{i:03d}-of-{num_shards:03d}.array_record")
           for i in range(num_shards)]
  stamp = os.path.join(out_dir, "params.json")
  params = {"num_images": num_images, "width": width, "height": height, "num_shards": num_shards,
            "seed": seed}
  if os.path.exists(stamp) and json.load(open(stamp)) == params:
    return files
  rng = np.random.default_rng(seed)
  for i, (lo, hi) in enumerate(shard_writer.shard_ranges(num_images, num_shards)):
    shard_writer.write_shard(files[i], (
        records.encode_record({"id": k, "image": photo_jpeg(rng, width, height),
                               "caption": caption(rng)}) for k in range(lo, hi)))
  with open(stamp, "w") as f:
    json.dump(params, f)
  return files


def tokenizer_for(out_dir: str, max_len: int):
  """The released GLM SentencePiece model when the shared folder has it, else a small one trained
  here on the benchmark's own vocabulary (tokenising is a small share of the work either way)."""
  from bigvl.tokenizers import glm, sp_train
  glm_model = os.path.join(os.path.dirname(REPO), "shared", "tokenizers", "glm_chinese_sp.model")
  path = glm_model if os.path.exists(glm_model) else os.path.join(out_dir, "tokenizer.model")
  if not os.path.exists(path):
    rng = np.random.default_rng(1)
    sp_train.train_sentencepiece([caption(rng) for _ in range(2000)] + list(_EN) + list(_ZH),
                                 path, vocab_size=256)
  return glm.GLMTokenizer(path, max_len=max_len, lowercase=True), path


# ---------------------------------------------------------------------------- measurement
def _cpu_seconds(proc) -> tuple[float, float]:
  """CPU seconds of this process and of its children (the worker processes)."""
  def used(p):
    try:
      t = p.cpu_times()
      return t.user + t.system
    except Exception:  # a child that just exited
      return 0.0
  return used(proc), sum(used(p) for p in proc.children(recursive=True))


def measure(files: list[str], tokenizer, *, image_size: int, batch_size: int, workers: int,
            decoder: str, batches: int, warmup: int, resize: str = "cv2") -> dict:
  import psutil
  from bigvl.data import image_ops
  from bigvl.data.formats import image_text
  # Worker processes read the choice at import (spawn) or inherit it (fork).
  os.environ["BIGVL_JPEG_DECODER"] = image_ops.JPEG_DECODER = decoder
  os.environ["BIGVL_RESIZE"] = image_ops.RESIZE = resize
  ds = image_text.train_dataset(files, tokenizer=tokenizer, image_size=image_size,
                                batch_size=batch_size, seed=0, worker_count=workers)
  it = iter(ds)
  for _ in range(warmup):   # starts the workers and fills their buffers
    next(it)
  proc = psutil.Process()
  (main0, workers0), t0 = _cpu_seconds(proc), time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  wall = time.perf_counter() - t0
  main1, workers1 = _cpu_seconds(proc)
  main, workers_cpu = main1 - main0, workers1 - workers0
  cpu = main + workers_cpu
  assert batch["image"].shape == (batch_size, image_size, image_size, 3)
  del it, ds
  images = batches * batch_size
  return {"workers": workers, "decoder": decoder, "resize": resize, "images": images, "wall_s": wall, "cpu_s": cpu,
          "cpu_s_this_process": main, "cpu_s_workers": workers_cpu,
          "images_per_s": images / wall, "images_per_cpu_s": images / cpu if cpu else None,
          "images_per_s_per_worker": images / wall / max(1, workers)}


# A published anchor for what CLIP training reaches on H100s: NVIDIA NeMo's CLIP ViT-g/14 runs 935
# samples/s on one DGX H100 (8 GPUs), ≈ 117 per GPU; by the count of bigvl.train.flops (ViT-g/14:
# 40 layers of width 1408, MLP 6144, 257 tokens; text 24 × 1024, 77 tokens) ≈ 1.74 TFLOP per sample,
# so ≈ 0.21 of the H100's dense bf16 peak.
PUBLISHED_CLIP_MFU = 0.21


def h100_estimate(images_per_core: float, mfus: tuple[float, ...]) -> list[dict]:
  """Cores one H100 training M²-Encoder-0.4B needs, from its FLOPs at each MFU (an estimate)."""
  from bigvl.models import m2_encoder
  from bigvl.systems.m2_encoder import flops as m2_flops
  from bigvl.train import flops
  cfg = m2_encoder.config_for("0.4B")
  per_sample = m2_flops.train_flops(cfg, text_len=52, contrastive_batch=256)
  peak = flops.peak_flops("NVIDIA H100 80GB HBM3")
  out = []
  for mfu in mfus:
    samples = mfu * peak / per_sample
    out.append({"model": "M2-Encoder-0.4B, 224 px, text 52", "flops_per_sample": per_sample,
                "peak_flops": peak, "mfu": mfu, "samples_per_s": samples,
                "images_per_core": images_per_core, "cores_needed": samples / images_per_core})
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workers", default=",".join(str(i) for i in range(1, (os.cpu_count() or 1) + 1)),
                  help="comma-separated worker-process counts (0: decode in this process)")
  ap.add_argument("--decoders", default=",".join(DECODERS), help="simplejpeg, pil or both")
  ap.add_argument("--resize", default=",".join(RESIZERS),
                  help="the training resize after a scaled decode: cv2 (OpenCV bicubic), pil or both")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--width", type=int, default=500)
  ap.add_argument("--height", type=int, default=375)
  ap.add_argument("--num_images", type=int, default=2048)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
  ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  ap.add_argument("--max_len", type=int, default=52, help="text length")
  ap.add_argument("--dir", default="", help="where the shards go (default: a temporary folder)")
  ap.add_argument("--h100_mfu", default=f"{PUBLISHED_CLIP_MFU},0.45",
                  help="MFUs at which to estimate an H100's appetite (published CLIP rate, target)")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)

  from bigvl.data import image_ops
  decoders = [d for d in args.decoders.split(",") if d]
  unknown = set(decoders) - set(DECODERS)
  if unknown:
    ap.error(f"unknown decoders {sorted(unknown)}: use {DECODERS}")
  if "simplejpeg" in decoders and image_ops.simplejpeg is None:
    ap.error("simplejpeg is not installed (pip install -c constraints.txt -e .)")
  resizers = [r for r in args.resize.split(",") if r]
  if set(resizers) - set(RESIZERS):
    ap.error(f"unknown resize {sorted(set(resizers) - set(RESIZERS))}: use {RESIZERS}")
  if "cv2" in resizers and image_ops.cv2 is None:
    ap.error("OpenCV is not installed (pip install -c constraints.txt -e .)")
  tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bigvl_bench_data_")
  out_dir = args.dir or tmp.name
  t0 = time.perf_counter()
  files = make_shards(out_dir, args.num_images, args.width, args.height)
  tokenizer, tok_path = tokenizer_for(out_dir, args.max_len)
  print(f"shards: {args.num_images} JPEGs of {args.width}x{args.height} in {out_dir} "
        f"({time.perf_counter() - t0:.1f} s); tokenizer {tok_path}", flush=True)

  results = []
  print(f"{'decoder':>10} {'resize':>6} {'workers':>7} {'images/s':>9} {'img/s/worker':>12} "
        f"{'img/CPU-s':>9} {'ms CPU/img here + in workers':>29}")
  for decoder, resize in ((d, r) for d in decoders for r in resizers):
    for w in (int(x) for x in args.workers.split(",")):
      r = measure(files, tokenizer, image_size=args.image_size, batch_size=args.batch_size,
                  workers=w, decoder=decoder, batches=args.batches, warmup=args.warmup,
                  resize=resize)
      results.append(r)
      print(f"{decoder:>10} {resize:>6} {w:>7} {r['images_per_s']:9.0f} "
            f"{r['images_per_s_per_worker']:12.0f} "
            f"{r['images_per_cpu_s'] or 0:9.0f} "
            f"{1e3 * r['cpu_s_this_process'] / r['images']:20.2f} + "
            f"{1e3 * r['cpu_s_workers'] / r['images']:.2f}", flush=True)
  best = max((r["images_per_cpu_s"] or 0) for r in results
             if r["decoder"] == decoders[0] and r["resize"] == resizers[0])
  estimate = h100_estimate(best, tuple(float(x) for x in args.h100_mfu.split(",")))
  for e in estimate:
    print(f"estimate: an H100 at {e['mfu']:.0%} MFU trains M2-Encoder-0.4B at "
          f"≈{e['samples_per_s']:.0f} samples/s ({e['flops_per_sample'] / 1e9:.0f} GFLOP each); at "
          f"{best:.0f} images per CPU-second ({decoders[0]}) that is ≈{e['cores_needed']:.1f} cores")
  out = {"image_size": args.image_size, "source_size": [args.width, args.height],
         "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "results": results,
         "images_per_core": best, "h100_estimate": estimate}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  if tmp is not None:
    tmp.cleanup()
  return out


if __name__ == "__main__":
  main()
