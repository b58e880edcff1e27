"""Stage-1 losses (ITC, ITM, ITG) as pure functions of tensors (their gathers: :mod:`qformer_lightning.distributed`)."""

from qformer_lightning.losses.itc import (
    ItcOutput,
    clamp_temperature,
    clamp_temperature_,
    itc_loss,
    itc_similarity,
    itc_targets,
)
from qformer_lightning.losses.itg import itg_labels, itg_loss
from qformer_lightning.losses.itm import (
    has_negative,
    itm_logits_from_queries,
    itm_loss,
    itm_targets,
    negative_weights,
    sample_hard_negatives,
)

__all__ = [
    "ItcOutput",
    "clamp_temperature",
    "clamp_temperature_",
    "has_negative",
    "itc_loss",
    "itc_similarity",
    "itc_targets",
    "itg_labels",
    "itg_loss",
    "itm_logits_from_queries",
    "itm_loss",
    "itm_targets",
    "negative_weights",
    "sample_hard_negatives",
]
