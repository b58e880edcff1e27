"""Synthetic captions from a transformers image-to-text model, by nucleus sampling.

The default is BLIP's CapFilt setting (``models/blip.py`` of salesforce/BLIP, ``generate(sample=True)``):
prompt ``"a picture of "``, ``top_p`` 0.9, repetition penalty 1.1, 10 to 30 tokens including the
prompt, and top-k 50 (the transformers default BLIP ran with). The prompt is removed from the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qformer_lightning.seeding import digest_seed

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"


@dataclass(frozen=True)
class SamplingConfig:
    """How the captioner samples.

    Args:
        num_captions: captions sampled per image (BLIP-2: 10).
        top_p: nucleus sampling mass.
        top_k: top-k filter applied with ``top_p`` (0 disables it).
        max_length: longest output in tokens; for decoder-only captioners (BLIP) it includes the prompt.
        min_length: shortest output in tokens (same convention).
        repetition_penalty: transformers' repetition penalty (BLIP sampling: 1.1).
        prompt: text prefix fed to captioners that take one (BLIP); ``""`` for none. It is cut
            from the generated text.
    """

    num_captions: int = 10
    top_p: float = 0.9
    top_k: int = 50
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.1
    prompt: str = "a picture of "

    def __post_init__(self) -> None:
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")


def batch_seed(seed: int, shard: str, batch: int) -> int:
    """A 63-bit sampling seed for batch ``batch`` of shard ``shard`` (independent of rank and worker)."""
    return digest_seed(seed, shard, batch)


def strip_prompt(text: str, prompt: str) -> str:
    """``text`` without a leading ``prompt`` (case-insensitive, whitespace-trimmed)."""
    text, head = text.strip(), prompt.strip()
    if head and text.lower().startswith(head.lower()):
        text = text[len(head) :]
    return text.strip()


class Captioner:
    """Samples ``num_captions`` captions per image with ``model.generate``.

    Args:
        model: a transformers image-to-text model with ``generate(pixel_values=..., ...)``
            (``BlipForConditionalGeneration``, ``VisionEncoderDecoderModel``, ...), in eval mode.
        tokenizer: its tokenizer (encodes the prompt, decodes the output).
        sampling: sampling settings.
    """

    def __init__(self, model: nn.Module, tokenizer, sampling: SamplingConfig = SamplingConfig()) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_CAPTIONER,
        sampling: SamplingConfig = SamplingConfig(),
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Captioner:
        """Load the model (``AutoModelForImageTextToText``) and tokenizer from a hub id or a directory."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from qformer_lightning.errors import explain_hub_errors

        with explain_hub_errors(name_or_path, "captioner", "--captioner"):
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return cls(model, tokenizer, sampling)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def generate(self, pixel_values: Tensor, seed: int) -> list[list[str]]:
        """Sample captions.

        Args:
            pixel_values: (B, 3, S, S) images as the model's image processor prepared them.
            seed: sampling seed (the global RNG state is restored afterwards).

        Returns:
            B lists of ``num_captions`` captions (prompt removed, stripped; may be empty strings).
        """
        s = self.sampling
        batch = pixel_values.shape[0]
        if batch == 0:
            return []
        inputs: dict[str, Tensor] = {"pixel_values": pixel_values.to(self.device, self.dtype)}
        if s.prompt:
            enc = self.tokenizer([s.prompt] * batch, return_tensors="pt")
            inputs["input_ids"] = enc["input_ids"].to(self.device)  # (B, T)
            inputs["attention_mask"] = enc["attention_mask"].to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                **inputs,
                do_sample=True,
                top_p=s.top_p,
                top_k=s.top_k,
                num_return_sequences=s.num_captions,
                max_length=s.max_length,
                min_length=s.min_length,
                repetition_penalty=s.repetition_penalty,
            )  # (B * num_captions, L), image-major
        texts = [strip_prompt(t, s.prompt) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        n = s.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(batch)]
