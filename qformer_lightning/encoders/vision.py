"""Frozen image encoders (timm ViTs) with BLIP-2's trainable ``ln_vision``.

Glossary: B batch, N image tokens (1 + (image_size / patch)^2: 257 at 224 px, 677 at 364 px
for patch 14), Dv vision width.

BLIP-2 takes the second-last layer of the ViT (the last block is removed), with no final ViT
norm, then a new LayerNorm (``ln_vision``). Position embeddings are interpolated when the
encoder runs at a larger resolution than it was trained at (364 px captioning/retrieval,
490 px VQA).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from qformer_lightning.errors import check_image_size, check_input_size, explain_hub_errors

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TimmVisionEncoder(nn.Module):
    """A timm ViT cut to its second-last block, followed by ``ln_vision``.

    Args:
        model_name: a timm model name; BLIP-2 uses ``eva_giant_patch14_clip_224`` (EVA01-CLIP-g/14,
            1408 wide) and ``vit_large_patch14_clip_224.openai`` (CLIP ViT-L/14, 1024 wide).
        image_size: input resolution; the position embeddings are built for it (and resampled
            from the checkpoint's grid when loading).
        pretrained: let timm load its own pretrained weights (needs its hub or cache).
        checkpoint_path: a local timm-format state dict (``.pth``/``.safetensors``, e.g. an
            EVA-CLIP visual tower or the demo's ``runs/demo/vit_pretrain/vit.safetensors``) to load
            instead. Read by :meth:`load_weights`, which the task calls when it sets the model up
            (``configure_model``, with its other weights), so that a config names a file a previous
            step will write; a missing file or keys that do not fit are errors then.
        num_removed_blocks: blocks cut from the end (BLIP-2: 1, the second-last layer's output).
        ln_vision_eps: eps of ``ln_vision`` (LAVIS: 1e-5; Hugging Face checkpoints use the vision
            config's eps).
        frozen: freeze the ViT (not ``ln_vision``) and keep it in eval mode.
        grad_checkpointing: activation checkpointing in the ViT blocks (for an unfrozen encoder).
        mean: per-channel normalisation mean the encoder expects (preprocessing).
        std: per-channel normalisation std.
        model_kwargs: extra timm constructor arguments (e.g. tiny ``embed_dim``/``depth`` in tests).
    """

    def __init__(
        self,
        model_name: str = "eva_giant_patch14_clip_224",
        image_size: int = 224,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        num_removed_blocks: int = 1,
        ln_vision_eps: float = 1e-5,
        frozen: bool = True,
        grad_checkpointing: bool = False,
        mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        std: tuple[float, float, float] = OPENAI_CLIP_STD,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("img_size", image_size)
        with explain_hub_errors(
            model_name if pretrained else None, "image encoder weights", "vision.init_args.checkpoint_path", local="file",
            download_hint="download the timm weights where the hub is reachable, then set pretrained: false and "
            "checkpoint_path to the file",
        ):
            vit = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        patch = vit.patch_embed.patch_size[0]
        check_image_size(image_size, patch, model_name, "vision.init_args.image_size")
        if not 0 <= num_removed_blocks < len(vit.blocks):
            raise ValueError(f"num_removed_blocks={num_removed_blocks} out of range for {len(vit.blocks)} blocks")
        if num_removed_blocks:
            vit.blocks = vit.blocks[:-num_removed_blocks]
        vit.norm = nn.Identity()  # no final ViT norm: ln_vision replaces it
        vit.set_grad_checkpointing(grad_checkpointing)
        self.vit = vit
        self.model_name = model_name
        self.image_size = image_size
        self.patch_size = patch
        self.width: int = vit.embed_dim
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.ln_vision = nn.LayerNorm(self.width, eps=ln_vision_eps)
        self.has_weight_source = pretrained or checkpoint_path is not None
        self.checkpoint_path = checkpoint_path
        self.num_removed_blocks = num_removed_blocks
        self._weights_loaded = checkpoint_path is None
        self.frozen = frozen
        if frozen:
            self.vit.requires_grad_(False)
            self.vit.eval()

    @property
    def num_tokens(self) -> int:
        """N: class token plus patches at ``image_size``."""
        grid = self.image_size // self.patch_size
        return grid * grid + getattr(self.vit, "num_prefix_tokens", 1)

    def train(self, mode: bool = True) -> "TimmVisionEncoder":
        """Keep a frozen ViT in eval mode (no dropout / drop-path) whatever the task's mode."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def load_weights(self) -> None:
        """Load ``checkpoint_path`` into the ViT, once (no-op without one or when already loaded).

        The file holds the whole ViT in timm's key names: the blocks this encoder cut and the final
        norm are skipped, position embeddings are resampled to ``image_size``.

        Raises:
            FileNotFoundError: the file does not exist (the message names the option).
            ValueError: keys or shapes do not fit the model (named in the message).
        """
        if self._weights_loaded:
            return
        load_timm_checkpoint(self.vit, self.checkpoint_path, removed_blocks=self.num_removed_blocks)
        self._weights_loaded = True

    def forward_vit(self, images: Tensor) -> Tensor:
        """ViT up to the kept blocks, no norm. (B, 3, H, W) -> (B, N, Dv)."""
        check_input_size(images.shape[-2], images.shape[-1], self.image_size)
        if not self._weights_loaded:  # used outside a task (no configure_model): never run random weights
            self.load_weights()
        images = images.to(self.vit.patch_embed.proj.weight.dtype)  # a frozen ViT may be cast to bf16/fp16
        if self.frozen:
            with torch.no_grad():
                return self.vit.forward_features(images)
        return self.vit.forward_features(images)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, N, Dv) features after ``ln_vision``."""
        features = self.forward_vit(images)
        return self.ln_vision(features.to(self.ln_vision.weight.dtype))


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic resampling of ViT position embeddings to another square grid.

    Args:
        pos_embed: (1, prefix + G*G, Dv).
        new_grid: G', the new grid side.
        num_prefix_tokens: class/register tokens kept as they are.

    Returns:
        (1, prefix + G'*G', Dv).
    """
    return resample_abs_pos_embed(
        pos_embed, new_size=[new_grid, new_grid], num_prefix_tokens=num_prefix_tokens, interpolation="bicubic"
    )


def load_timm_checkpoint(vit: nn.Module, path: str | Path, removed_blocks: int = 0) -> None:
    """Load a local timm-format ViT state dict, resampling position embeddings to the model's grid.

    Args:
        vit: the timm ViT (possibly with its last blocks cut and its norm replaced).
        path: ``.safetensors`` or a ``torch.save`` file (a state dict, or one under ``state_dict``/``model``).
        removed_blocks: blocks cut from ``vit`` after the file's last kept block: their keys, and
            the final ``norm.``/``fc_norm.``/``head.`` keys, are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: keys or shapes do not fit the model (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"vision checkpoint not found: {path} (model.vision.init_args.checkpoint_path; the demo's file is "
            "written by `python -m qformer_lightning fit --config configs/demo/vit_pretrain.yaml`)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    target = vit.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        grid = vit.patch_embed.grid_size[0]
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid, getattr(vit, "num_prefix_tokens", 1))
    kept = len(vit.blocks)
    skipped = ("head.", "norm.", "fc_norm.", *(f"blocks.{i}." for i in range(kept, kept + removed_blocks)))
    state = {k: v for k, v in state.items() if not k.startswith(skipped) or k in target}
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items() if k in target and v.shape != target[k].shape]
    if shapes:
        raise ValueError(f"vision checkpoint {path} does not fit: shape mismatch {shapes[:10]}")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    unused = ("head.", "norm.", "fc_norm.")  # the final norm and head are removed anyway
    missing = [k for k in missing if not k.startswith(unused)]
    if missing or unexpected:
        raise ValueError(f"vision checkpoint {path} does not fit: missing {missing}, unexpected {unexpected}")
    log.info("loaded vision weights from %s", path)
