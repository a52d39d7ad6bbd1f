"""The video tower (bigvl/models/layers/video.py): frames through any image tower, then mean or
seqTransf temporal mixing; padding frames change nothing, frame order matters only with mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigvl.models.layers.video import VideoTower, masked_mean

B, T, S, D = 2, 4, 8, 16


class _Frames(nnx.Module):
  """A stand-in image tower: mean pixel colour → a linear map."""

  def __init__(self, rngs):
    self.proj = nnx.Linear(3, D, rngs=rngs)

  def __call__(self, images):
    return self.proj(images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0)


def _frames(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, T, S, S, 3)), jnp.uint8)


@pytest.mark.parametrize("temporal", ["mean", "transformer"])
def test_padding_frames_change_nothing(temporal):
  enc = _Frames(nnx.Rngs(0))
  tower = VideoTower(D, T, temporal=temporal, depth=2, heads=2, rngs=nnx.Rngs(1), init_std=0.2)
  frames = _frames()
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
  tokens, clip = tower(enc, frames, mask)
  assert tokens.shape == (B, T, D) and clip.shape == (B, D)
  other = frames.at[0, 3].set(0).at[1, 2:].set(255)     # only padding frames changed
  tokens2, clip2 = tower(enc, other, mask)
  np.testing.assert_allclose(clip, clip2, atol=1e-5)
  np.testing.assert_allclose(tokens[0, :3], tokens2[0, :3], atol=1e-5)
  np.testing.assert_allclose(clip, masked_mean(tokens, mask), atol=1e-6)


def test_order_matters_only_with_temporal_mixing():
  enc = _Frames(nnx.Rngs(0))
  frames, mask = _frames(), jnp.ones((B, T), jnp.int32)
  reverse = frames[:, ::-1]
  mean = VideoTower(D, T, temporal="mean", rngs=nnx.Rngs(1))
  np.testing.assert_allclose(mean(enc, frames, mask)[1], mean(enc, reverse, mask)[1], atol=1e-5)
  mixed = VideoTower(D, T, temporal="transformer", depth=2, heads=2, rngs=nnx.Rngs(1),
                     init_std=0.2)
  assert float(jnp.abs(mixed(enc, frames, mask)[1] - mixed(enc, reverse, mask)[1]).max()) > 1e-3


def test_errors():
  with pytest.raises(ValueError, match="temporal"):
    VideoTower(D, T, temporal="lstm", rngs=nnx.Rngs(0))
  tower = VideoTower(D, 2, temporal="transformer", depth=1, heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="frame positions"):
    tower(_Frames(nnx.Rngs(0)), _frames(), jnp.ones((B, T), jnp.int32))
