"""Image decoding and normalisation in numpy/PIL (no TensorFlow).

Matches the M²-Encoder reference inference transform: resize the whole image
to size×size with PIL bicubic (no crop, aspect ratio not kept), scale to
[0, 1], then (x - 0.5) / 0.5. Images are kept as uint8 until batching so that
prefetch buffers hold 4× less memory than float32 would.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes, image_size: int, *, draft: bool = True) -> np.ndarray:
  """Decodes an encoded image to uint8 RGB of shape (image_size, image_size, 3).

  Args:
    data: the bytes of a JPEG, PNG or any other PIL-readable file.
    image_size: output height and width.
    draft: let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when that is
      still at least image_size on both sides. Much cheaper for large photos;
      pixels differ slightly from a full decode, so evaluation that must match
      the reference bit-for-bit turns it off.

  Raises:
    OSError, ValueError, Image.DecompressionBombError (and subclasses such as
    PIL.UnidentifiedImageError) when the bytes are not a readable image.
  """
  with Image.open(io.BytesIO(data)) as img:
    if draft and img.format == "JPEG":
      img.draft("RGB", (image_size, image_size))
    # convert() forces the full decode, so truncated files raise here.
    rgb = img.convert("RGB")
  if rgb.size != (image_size, image_size):
    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(rgb, dtype=np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], in the reference's order of ops."""
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) / np.float32(0.5)
