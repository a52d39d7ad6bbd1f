"""Losses."""

from bigvl.losses.accumulate import accumulated_value_and_grad
from bigvl.losses.contrastive import dense_contrastive_loss
from bigvl.losses.ring import contrastive_loss

__all__ = ["accumulated_value_and_grad", "contrastive_loss", "dense_contrastive_loss"]
