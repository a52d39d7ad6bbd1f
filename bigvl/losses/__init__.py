"""Losses."""

from bigvl.losses.accumulate import accumulated_value_and_grad
from bigvl.losses.contrastive import dense_contrastive_loss
# Not the `negnce` function: that name stays the submodule (`from bigvl.losses import negnce`).
from bigvl.losses.negnce import infonce_symmetric, negnce_symmetric
from bigvl.losses.ranking import margin_ranking
from bigvl.losses.ring import contrastive_loss

__all__ = ["accumulated_value_and_grad", "contrastive_loss", "dense_contrastive_loss",
           "infonce_symmetric", "margin_ranking", "negnce_symmetric"]
