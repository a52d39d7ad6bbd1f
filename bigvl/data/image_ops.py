"""Image decoding and normalisation in numpy/PIL (no TensorFlow).

Matches the M²-Encoder reference inference transform: resize the whole image
to size×size with PIL bicubic (no crop, aspect ratio not kept), scale to
[0, 1], then (x - 0.5) / 0.5. Images are kept as uint8 until batching so that
prefetch buffers hold 4× less memory than float32 would.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

try:
  import simplejpeg
except ImportError:  # a platform without its wheel: PIL decodes everything
  simplejpeg = None
try:
  import cv2
  cv2.setNumThreads(1)   # one image per call in each worker process: no thread pool
except ImportError:  # a platform without its wheel: PIL resizes
  cv2 = None

# Which library decodes JPEGs in draft mode: "simplejpeg" (default where installed) or "pil"
# (launch/bench_data.py compares the two). Read at import, so worker processes inherit it.
JPEG_DECODER = os.environ.get("BIGVL_JPEG_DECODER", "simplejpeg" if simplejpeg else "pil")
_JPEG_MAGIC = b"\xff\xd8"
# Which library resizes in training (draft) decoding: "cv2" (OpenCV's bicubic, ≈ 8× faster than
# PIL's on one core, no antialiasing: what is left after libjpeg-turbo's scaled decoding is a mild
# downscale) or "pil" (PIL's antialiased bicubic, as the reference transform and evaluation use).
RESIZE = os.environ.get("BIGVL_RESIZE", "cv2" if cv2 is not None else "pil")

# Transparent pixels (RGBA, LA, PA, a palette with a transparent index) are composed onto this
# colour, everywhere an image is decoded: building shards, training and evaluation alike.
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL image as 8-bit RGB (decoding it fully, so truncated files raise here).

  * 16-bit grey (PNG "I;16") is scaled by 255/65535, 32-bit integer ("I") and float ("F") grey
    are clipped to [0, 255] (PIL's plain convert() would clip 16-bit, turning it all white);
  * alpha (RGBA, LA, PA, "transparency" of P and L images) is composed onto BACKGROUND;
  * CMYK, YCbCr, LAB, HSV, 1-bit and grey convert as PIL converts them.
  """
  mode = img.mode
  if mode in _SIXTEEN_BIT or (mode == "I" and img.format == "PNG"):
    grey = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
  if mode in ("I", "F"):
    grey = np.clip(np.rint(np.asarray(img, np.float64)), 0, 255)
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  return img.convert("RGB")


def _decode_jpeg_scaled(data: bytes, image_size: int) -> np.ndarray | None:
  """RGB at the smallest of libjpeg-turbo's M/8 scales that keeps both sides >= image_size.

  PIL's draft mode only has 1/2, 1/4 and 1/8, so a 500×375 photo bound for 224 is decoded whole;
  at 5/8 (313×235) decoding and the bicubic resize both do about 2.5× less work. None when
  simplejpeg cannot decode the data (CMYK, corrupt): PIL then decodes it, or raises.
  """
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    if height * width > 2 * (Image.MAX_IMAGE_PIXELS or float("inf")):
      raise Image.DecompressionBombError(f"{width}x{height} pixels")  # as PIL would
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=image_size,
                                  min_width=image_size)
  except ValueError:
    return None


def decode_image(data: bytes, image_size: int, *, draft: bool = True) -> np.ndarray:
  """Decodes an encoded image to uint8 RGB of shape (image_size, image_size, 3).

  Args:
    data: the bytes of a JPEG, PNG or any other PIL-readable file.
    image_size: output height and width.
    draft: decode a JPEG at a reduced scale that is still at least image_size
      on both sides (libjpeg-turbo's M/8 scales through simplejpeg, or PIL's
      1/2, 1/4, 1/8), then resize with RESIZE (OpenCV by default). Much
      cheaper for photos; pixels differ slightly from a full decode and PIL's
      resize, so evaluation that must match the reference bit-for-bit turns
      it off.

  Raises:
    OSError, ValueError, Image.DecompressionBombError (and subclasses such as
    PIL.UnidentifiedImageError) when the bytes are not a readable image.
  """
  if draft and JPEG_DECODER == "simplejpeg" and data[:2] == _JPEG_MAGIC:
    pixels = _decode_jpeg_scaled(data, image_size)
    if pixels is not None:
      if pixels.shape[:2] == (image_size, image_size):
        return pixels
      if RESIZE == "cv2":
        return cv2.resize(pixels, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
      return np.asarray(Image.fromarray(pixels).resize((image_size, image_size),
                                                       Image.Resampling.BICUBIC), dtype=np.uint8)
  with Image.open(io.BytesIO(data)) as img:
    if draft and img.format == "JPEG":
      img.draft("RGB", (image_size, image_size))
    rgb = to_rgb(img)
  if rgb.size != (image_size, image_size):
    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(rgb, dtype=np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], in the reference's order of ops."""
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) / np.float32(0.5)
