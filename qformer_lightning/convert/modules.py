"""Describe built modules by their constructor arguments, and rebuild them.

Our own checkpoint format and the exporters need a model's shape without a config object:
these functions read it off the modules (layer counts, widths, heads, eps) and produce the
keyword arguments that rebuild the same structure.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qformer_lightning.convert.report import CheckpointError
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.qformer import QFormer

EVA_MODEL_NAME = "eva_giant_patch14_clip_224"
"""timm family used for every EVA-shaped vision tower we import (Hugging Face Blip2 and LAVIS)."""


def mlp_ratio_for(width: int, hidden: int) -> float:
    """An ``mlp_ratio`` for which timm builds exactly ``hidden`` MLP units (it takes
    ``int(width * mlp_ratio)``, and ``hidden / width`` can land just below the integer)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def set_vit_norm_eps(vision: TimmVisionEncoder, eps: float) -> None:
    """Set the eps of every LayerNorm inside the ViT blocks (not ``ln_vision``).

    timm's EVA takes its norm eps only as a ``norm_layer`` callable, which a YAML/JSON config
    cannot hold; checkpoints fix it instead (Hugging Face: the vision config's
    ``layer_norm_eps``; LAVIS: 1e-6, timm's default).
    """
    for module in vision.vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


def vit_norm_eps(vision: TimmVisionEncoder) -> float:
    """eps of the first block's first LayerNorm."""
    return float(vision.vit.blocks[0].norm1.eps)


def vision_init_args(vision: TimmVisionEncoder) -> dict[str, Any]:
    """Constructor arguments of :class:`TimmVisionEncoder` that rebuild ``vision``'s structure with
    its blocks already cut (``num_removed_blocks=0``, ``depth`` = kept blocks)."""
    vit = vision.vit
    block = vit.blocks[0]
    attn = block.attn
    has_bias = getattr(attn, "q_bias", None) is not None or getattr(attn.qkv, "bias", None) is not None
    return dict(
        model_name=vision.model_name,
        image_size=vision.image_size,
        num_removed_blocks=0,
        ln_vision_eps=float(vision.ln_vision.eps),
        frozen=vision.frozen,
        mean=list(vision.mean),
        std=list(vision.std),
        model_kwargs=dict(
            embed_dim=vision.width,
            depth=len(vit.blocks),
            num_heads=attn.num_heads,
            mlp_ratio=mlp_ratio_for(vision.width, block.mlp.fc1.out_features),
            patch_size=vision.patch_size,
            qkv_bias=has_bias,
        ),
    )


def build_vision(args: dict[str, Any], norm_eps: float | None = None) -> TimmVisionEncoder:
    """Build a :class:`TimmVisionEncoder` from :func:`vision_init_args` output and check the MLP width.

    Args:
        args: constructor arguments.
        norm_eps: eps of the ViT block norms (see :func:`set_vit_norm_eps`); None keeps timm's.

    Raises:
        CheckpointError: the requested MLP width is not what timm built (``int(D * mlp_ratio)``).
    """
    args = dict(args)
    for key in ("mean", "std"):
        if key in args:
            args[key] = tuple(args[key])
    vision = TimmVisionEncoder(**args)
    kwargs = args.get("model_kwargs") or {}
    if "mlp_ratio" in kwargs:
        want = int(kwargs["embed_dim"] * kwargs["mlp_ratio"])
        got = vision.vit.blocks[0].mlp.fc1.out_features
        if got != want:
            raise CheckpointError(f"timm built an MLP of width {got} for mlp_ratio {kwargs['mlp_ratio']}, expected {want}")
    if norm_eps is not None:
        set_vit_norm_eps(vision, norm_eps)
    return vision


def qformer_init_args(qformer: QFormer) -> dict[str, Any]:
    """Constructor arguments of :class:`QFormer` that rebuild ``qformer``'s structure."""
    layer = qformer.layers[0]
    args: dict[str, Any] = dict(
        num_layers=len(qformer.layers),
        hidden_size=qformer.hidden_size,
        num_heads=layer.self_attn.num_heads,
        intermediate_size=layer.query_ffn.fc1.out_features,
        num_query_tokens=qformer.num_query_tokens,
        cross_attention_freq=qformer.cross_attention_freq,
        vision_width=qformer.vision_width,
        layer_norm_eps=float(qformer.embed_norm.eps),
        dropout=float(qformer.embed_dropout.p),
        attention_dropout=float(layer.self_attn.attention_dropout),
        text_ffn=qformer.has_text,
        initializer_range=qformer.initializer_range,
    )
    if qformer.word_embeddings is not None and qformer.position_embeddings is not None:
        args.update(
            vocab_size=qformer.word_embeddings.num_embeddings,
            max_position_embeddings=qformer.position_embeddings.num_embeddings,
            pad_token_id=qformer.word_embeddings.padding_idx if qformer.word_embeddings.padding_idx is not None else 0,
        )
    return args


def check_eva(vision: TimmVisionEncoder, target: str) -> None:
    """Raise unless ``vision`` is an EVA-shaped ViT (pre-norm blocks, fused qkv with q/v biases or
    none, no layer scale, no pre-transformer norm, GELU MLP): the shape Hugging Face's
    ``Blip2VisionModel`` and LAVIS's EVA ViT have.

    Args:
        vision: the encoder to export.
        target: the format named in the message.
    """
    vit = vision.vit
    block = vit.blocks[0]
    problems = []
    if type(vit).__name__ != "Eva":
        problems.append(f"timm class {type(vit).__name__} (need Eva)")
    if not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("a pre-transformer norm")
    if getattr(block, "gamma_1", None) is not None:
        problems.append("layer scale")
    if getattr(vit, "rope", None) is not None:
        problems.append("rotary embeddings")
    if not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity):
        problems.append("an attention scale norm")
    if type(block.mlp).__name__ != "Mlp" or not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none":
        problems.append(f"MLP {type(block.mlp).__name__} (need Mlp with exact GELU)")
    if problems:
        raise CheckpointError(f"{vision.model_name} cannot be written in the {target} layout: it has {', '.join(problems)}")
