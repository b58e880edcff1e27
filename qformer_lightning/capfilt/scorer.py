"""Image-text similarity with a transformers CLIP model (CapFilt ranks captions by it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """Cosine similarity between an image's CLIP embedding and each of its candidate captions.

    Args:
        model: a transformers ``CLIPModel`` (``get_image_features`` / ``get_text_features``), eval mode.
        tokenizer: its tokenizer (texts are truncated to ``max_text_length`` tokens).
        max_text_length: CLIP's context length (77 for OpenAI CLIP).
    """

    def __init__(self, model: nn.Module, tokenizer, max_text_length: int = 77) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_CLIP, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ClipScorer:
        """Load ``CLIPModel`` and its tokenizer from a hub id or a directory."""
        from transformers import AutoTokenizer, CLIPModel

        from qformer_lightning.errors import explain_hub_errors

        with explain_hub_errors(name_or_path, "CLIP model", "--clip"):
            model = CLIPModel.from_pretrained(name_or_path, dtype=dtype).to(device)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, tokenizer, int(model.config.text_config.max_position_embeddings))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def score(self, pixel_values: Tensor, texts: Sequence[Sequence[str]]) -> list[list[float]]:
        """Similarities of each image with its own candidates.

        Args:
            pixel_values: (B, 3, S, S) images as CLIP's image processor prepared them.
            texts: B lists of candidate captions (any lengths, non-empty strings).

        Returns:
            B lists of cosine similarities in [-1, 1], in the order of ``texts``.
        """
        if pixel_values.shape[0] != len(texts):
            raise ValueError(f"ClipScorer.score: {pixel_values.shape[0]} images but {len(texts)} caption lists")
        flat = [t for group in texts for t in group]
        if not flat:
            return [[] for _ in texts]
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)  # (C,)
        image = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        enc = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        text = self.model.get_text_features(**enc).pooler_output
        image = F.normalize(image.float(), dim=-1)  # (B, D)
        text = F.normalize(text.float(), dim=-1)  # (C, D)
        sims = (image[owner] * text).sum(-1).tolist()  # (C,)
        out, start = [], 0
        for group in texts:
            out.append(sims[start : start + len(group)])
            start += len(group)
        return out
