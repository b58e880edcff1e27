"""Image-grounded text generation loss of BLIP-2 stage 1 (ITG).

Glossary: B batch, T text tokens, V vocabulary.

The text pass runs under the multimodal causal mask with ``[DEC]`` in place of ``[CLS]`` as the
first token. Position t predicts token t + 1: the first target is the token after ``[DEC]``
(``[DEC]`` itself, the begin-of-sequence, is never a target) and padding is never a target.
The loss is the label-smoothed (0.1) cross-entropy averaged over all target tokens of the batch,
as LAVIS (``BertLMHeadModel`` with ``label_smoothing=0.1``, labels = ids with padding -> -100).
Truncation to 32 tokens is the tokenizer's job (``max_length=32``); this loss takes any T.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def itg_labels(input_ids: Tensor, attention_mask: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets: (B, T) ids and mask -> (B, T - 1) labels for positions 0 .. T - 2.

    ``labels[b, t] = input_ids[b, t + 1]`` where that token is real (mask 1), else ``ignore_index``.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            "input_ids and attention_mask must both be (B, T), got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    targets = input_ids[:, 1:]  # (B, T-1)
    return targets.masked_fill(~attention_mask[:, 1:].bool(), ignore_index)


def itg_loss(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    label_smoothing: float = 0.1,
    ignore_index: int = -100,
) -> Tensor:
    """Causal language-modelling loss of the caption.

    Args:
        logits: (B, T, V) LM-head outputs of the text positions (``[DEC]`` first).
        input_ids: (B, T) the decoder input ids (``[DEC]``, caption, padding).
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        label_smoothing: epsilon (BLIP-2: 0.1), PyTorch's convention (eps spread over V).
        ignore_index: label value of non-targets.

    Returns:
        scalar float32 loss, the mean over the target tokens of the whole batch (NaN if the
        batch holds no target token, i.e. every text is one token long).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (B, T, V) matching input_ids (B, T), got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    labels = itg_labels(input_ids, attention_mask, ignore_index)  # (B, T-1)
    shifted = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t + 1
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
