"""JPEG decoding for training (simplejpeg's M/8 scales, PIL's draft) and launch/bench_data.py."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bigvl.data import image_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "bench_data.py")


def _module():
  spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def photo() -> bytes:
  return _module().photo_jpeg(np.random.default_rng(0), 500, 375)


def _decode(data, size, decoder, monkeypatch, draft=True):
  monkeypatch.setattr(image_ops, "JPEG_DECODER", decoder)
  return image_ops.decode_image(data, size, draft=draft)


@pytest.mark.skipif(image_ops.simplejpeg is None, reason="simplejpeg not installed")
def test_scaled_decoding_matches_a_full_decode(photo, monkeypatch):
  full = _decode(photo, 224, "pil", monkeypatch, draft=False)
  for decoder in ("simplejpeg", "pil"):
    got = _decode(photo, 224, decoder, monkeypatch)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - full.astype(int)).mean() < 3, decoder
  # 500×375 → 224 is decoded at 5/8 (313×235), which PIL's draft (1/2 at best) cannot do.
  assert image_ops._decode_jpeg_scaled(photo, 224).shape == (235, 313, 3)
  assert image_ops._decode_jpeg_scaled(photo, 100).shape == (141, 188, 3)   # 3/8


@pytest.mark.skipif(image_ops.simplejpeg is None, reason="simplejpeg not installed")
def test_simplejpeg_path_falls_back_or_raises_like_pil(photo, monkeypatch):
  monkeypatch.setattr(image_ops, "JPEG_DECODER", "simplejpeg")
  with pytest.raises(OSError):
    image_ops.decode_image(photo[: len(photo) // 2], 64)          # truncated
  with pytest.raises(OSError):
    image_ops.decode_image(b"\xff\xd8not a jpeg", 64)
  rng = np.random.default_rng(1)
  for mode in ("L", "CMYK"):                                        # CMYK: PIL decodes it
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)).convert(mode).save(buf, "JPEG")
    assert image_ops.decode_image(buf.getvalue(), 32).shape == (32, 32, 3)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(Image.DecompressionBombError):
    image_ops.decode_image(photo, 64)


def test_bench_data_writes_its_figures(tmp_path):
  out = tmp_path / "bench.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(
      [sys.executable, SCRIPT, "--workers=0,1", "--decoders=simplejpeg,pil", "--resize=cv2",
       "--num_images=96",
       "--batch_size=8", "--batches=3", "--warmup=1", "--image_size=64", "--width=160",
       "--height=120", f"--dir={tmp_path / 'shards'}", f"--json={out}"],
      check=True, env=env, timeout=600)
  r = json.loads(out.read_text())
  assert [(x["decoder"], x["resize"], x["workers"]) for x in r["results"]] == [
      ("simplejpeg", "cv2", 0), ("simplejpeg", "cv2", 1), ("pil", "cv2", 0), ("pil", "cv2", 1)]
  for x in r["results"]:
    assert x["images"] == 24 and x["images_per_s"] > 0
    # The read-ahead (threads in this process, or a worker) may have decoded all of these few
    # images into its buffer during warm-up, leaving no CPU to measure (None).
    assert x["images_per_cpu_s"] is None or x["images_per_cpu_s"] > 0
  low, target = r["h100_estimate"]
  assert 100e9 < target["flops_per_sample"] < 160e9 and target["mfu"] == 0.45
  assert 0 < low["cores_needed"] < target["cores_needed"]
