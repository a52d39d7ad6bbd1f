"""What the video systems share: the embedded video world, built once per machine (by process 0;
the others wait), at the run's frame size and frame count."""

from __future__ import annotations

import jax
import ml_collections


def build_video_world(c: ml_collections.ConfigDict, frame_size: int) -> str:
  """The video world's directory for `c.data` (its `dir`, or the cache's for this frame size and
  `num_frames`), built now if it is not there."""
  from data_pipelines import build_videos
  frames = c.data.num_frames
  data_dir = c.data.dir or str(build_videos.default_dir(frame_size, frames))
  if jax.process_index() == 0:
    w = c.data.world
    build_videos.build(data_dir, seed=w.seed, frame_size=frame_size, num_frames=frames,
                       fps=w.fps, num_train=w.num_train, num_eval=w.num_eval,
                       num_shards=w.num_shards)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("bigvl_videos_built")
  return data_dir
