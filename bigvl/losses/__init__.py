"""Losses."""

from bigvl.losses.contrastive import dense_contrastive_loss

__all__ = ["dense_contrastive_loss"]
