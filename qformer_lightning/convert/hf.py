"""Hugging Face ``transformers`` Blip2 checkpoints <-> our modules.

Glossary: D Q-Former width, Dv vision width.

Supported sources (a ``save_pretrained`` directory or a hub id):

- ``Blip2ForImageTextRetrieval`` (``Salesforce/blip2-itm-vit-g``, ``-coco``): everything of the
  stage-1 model -> :class:`~qformer_lightning.models.blip2.Blip2QFormerModel`. Hugging Face keeps
  neither the ITC temperature nor the Q-Former LM head: ours stay initialised (the LM decoder tied
  to the word embeddings) and are reported as missing.
- ``Blip2ForConditionalGeneration`` / ``Blip2Model`` (``Salesforce/blip2-opt-2.7b``, ...): vision +
  Q-Former (without text parts) -> :class:`~qformer_lightning.convert.parts.VisionQFormer`; the
  ``language_projection.*``/``language_model.*`` tensors come back untouched (:func:`split_hf_state_dict`).
  With ``use_qformer_text_input`` these classes hold text FFNs but no text embeddings: the weights
  present, not that flag, decide the Q-Former's text parts, so such FFNs are ignored (noted).
- ``Blip2QFormerModel``: a bare Q-Former (no query tokens, no text embeddings) -> :class:`QFormer`.

Files are read by :mod:`.hf_files`; the format is recognised by :mod:`.checkpoint`. Into a model
that is already built, :func:`hf_state_to_ours` maps whatever the checkpoint holds (the language
side included: ``language_projection.*`` -> ``projection.*``, ``language_model.*`` -> ``llm.model.*``).

Name mapping (theirs -> ours): Q-Former ``attention.attention.{query,key,value}`` -> fused
``self_attn.qkv_proj`` (rows ``[q; k; v]``), ``crossattention.attention.{key,value}`` -> fused
``cross_attn.kv_proj``, ``intermediate``/``output`` -> ``text_ffn``, ``intermediate_query``/
``output_query`` -> ``query_ffn``, ``qformer.layernorm`` -> ``qformer.embed_norm``; the vision tower
is EVA-shaped: ``self_attn.qkv.bias`` holds ``[q_bias; 0; v_bias]`` -> timm's ``attn.q_bias``/
``attn.v_bias`` (a key bias adds the same amount to every logit of a row, so softmax ignores it),
``post_layernorm`` -> ``ln_vision``. The ViT blocks in the checkpoint are already the kept ones
(the last EVA block was removed before conversion), so we build them with ``num_removed_blocks=0``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer_lightning.convert.hf_files import read_hf_checkpoint
from qformer_lightning.convert.keymap import KeyMap, KeyRule, bert_layer_rules, rename, rename_prefixes
from qformer_lightning.convert.modules import (
    EVA_MODEL_NAME,
    build_vision,
    check_eva,
    mlp_ratio_for,
    vit_norm_eps,
)
from qformer_lightning.convert.parts import VisionQFormer
from qformer_lightning.convert.report import CheckpointError, ConversionReport, load_checked
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"language_projection.": "projection.", "language_model.": "llm.model."}
"""The language side of a generative Hugging Face Blip2 checkpoint: its key prefixes -> ours
(:class:`~qformer_lightning.models.blip2_llm.Blip2LLMModel`'s projection and LLM)."""
LANGUAGE_PREFIXES = tuple(LANGUAGE_NAMES)
"""Key prefixes of the language side of a generative Hugging Face Blip2 checkpoint."""

_TEXT_PARTS = re.compile(r"(embeddings\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)")
"""Q-Former text parts of a full Blip2 checkpoint: text embeddings and text FFNs (not ``*_query``)."""
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

_IGNORE = ("*position_ids",)
_NOT_IN_HF = ("temp", "lm_head.*")
"""Our parameters that Hugging Face Blip2 checkpoints never hold."""

# ----------------------------------------------------------------------------- key maps


def _vision_qkv_bias_to_ours(tensors: list[Tensor]) -> list[Tensor]:
    """(3*Dv,) ``[q; k; v]`` bias -> q (Dv,), v (Dv,); the key bias is dropped (softmax-invariant)."""
    q, _, v = tensors[0].chunk(3, dim=0)
    return [q.clone(), v.clone()]


def _vision_qkv_bias_to_theirs(tensors: list[Tensor]) -> list[Tensor]:
    """q (Dv,), v (Dv,) -> (3*Dv,) ``[q; 0; v]``."""
    q, v = tensors
    return [torch.cat([q, torch.zeros_like(q), v])]


def vision_rules(ours: str = "vision", theirs: str = "vision_model") -> list[KeyRule]:
    """Hugging Face ``Blip2VisionModel`` <-> our :class:`TimmVisionEncoder` (timm EVA + ``ln_vision``)."""
    o, t = f"{ours}.vit", theirs
    block, layer = f"{o}.blocks.{{i}}", f"{t}.encoder.layers.{{i}}"
    return [
        rename(f"{o}.cls_token", f"{t}.embeddings.class_embedding"),
        rename(f"{o}.pos_embed", f"{t}.embeddings.position_embedding"),
        rename(f"{o}.patch_embed.proj.{{p}}", f"{t}.embeddings.patch_embedding.{{p}}"),
        rename(f"{block}.norm1.{{p}}", f"{layer}.layer_norm1.{{p}}"),
        rename(f"{block}.attn.qkv.weight", f"{layer}.self_attn.qkv.weight"),
        KeyRule(
            (f"{block}.attn.q_bias", f"{block}.attn.v_bias"),
            (f"{layer}.self_attn.qkv.bias",),
            _vision_qkv_bias_to_ours,
            _vision_qkv_bias_to_theirs,
        ),
        rename(f"{block}.attn.proj.{{p}}", f"{layer}.self_attn.projection.{{p}}"),
        rename(f"{block}.norm2.{{p}}", f"{layer}.layer_norm2.{{p}}"),
        rename(f"{block}.mlp.fc1.{{p}}", f"{layer}.mlp.fc1.{{p}}"),
        rename(f"{block}.mlp.fc2.{{p}}", f"{layer}.mlp.fc2.{{p}}"),
        rename(f"{ours}.ln_vision.{{p}}", f"{t}.post_layernorm.{{p}}"),
    ]


def qformer_rules(bare: bool = False, text: bool = True) -> list[KeyRule]:
    """Hugging Face Q-Former <-> our :class:`QFormer`.

    Args:
        bare: a ``Blip2QFormerModel`` checkpoint (``layernorm.*``, ``encoder.layer.*``) into a bare
            QFormer; otherwise a full Blip2 (``qformer.*``, ``query_tokens``, ``embeddings.*``) into
            ``qformer.*`` of our model.
        text: include the text FFNs (and, in a full Blip2, the text embeddings).
    """
    ours, theirs = ("", "") if bare else ("qformer.", "qformer.")
    rules = [rename(f"{ours}embed_norm.{{p}}", f"{theirs}layernorm.{{p}}")]
    rules += bert_layer_rules(f"{ours}layers.{{i}}", f"{theirs}encoder.layer.{{i}}", attn="attention", text_ffn=text)
    if not bare:  # in a Blip2 model the query tokens and text embeddings live beside the Q-Former
        rules.append(rename("qformer.query_tokens", "query_tokens"))
        if text:
            rules += [
                rename("qformer.word_embeddings.weight", "embeddings.word_embeddings.weight"),
                rename("qformer.position_embeddings.weight", "embeddings.position_embeddings.weight"),
            ]
    return rules


def retrieval_keymap() -> KeyMap:
    """``Blip2ForImageTextRetrieval`` <-> :class:`Blip2QFormerModel`: every vision, Q-Former and head
    name of a full Blip2 checkpoint."""
    rules = vision_rules() + qformer_rules(text=True)
    rules += [
        rename("vision_proj.{p}", "vision_projection.{p}"),
        rename("text_proj.{p}", "text_projection.{p}"),
        rename("itm_head.linear.{p}", "itm_head.{p}"),
    ]
    return KeyMap(rules, ignore=_IGNORE)


def parts_keymap(text: bool) -> KeyMap:
    """Vision + Q-Former of any full Blip2 checkpoint <-> :class:`VisionQFormer`."""
    return KeyMap(vision_rules() + qformer_rules(text=text), ignore=_IGNORE)


def bare_qformer_keymap(text: bool) -> KeyMap:
    """Hugging Face ``Blip2QFormerModel`` (``layernorm.*``, ``encoder.layer.*``) <-> bare :class:`QFormer`."""
    return KeyMap(qformer_rules(bare=True, text=text), ignore=_IGNORE)


def split_hf_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a Blip2 state dict into (vision + Q-Former part, language part).

    The language part holds ``language_projection.*`` and ``language_model.*`` under their own
    names, for the stage-2 code's LLM adapter.
    """
    language = {k: v for k, v in state.items() if k.startswith(LANGUAGE_PREFIXES)}
    rest = {k: v for k, v in state.items() if not k.startswith(LANGUAGE_PREFIXES)}
    return rest, language


def has_text_embeddings(state: dict[str, Tensor]) -> bool:
    """Whether a full Blip2 state dict holds the Q-Former text embeddings (only
    ``Blip2ForImageTextRetrieval`` has them; ``use_qformer_text_input`` alone adds text FFNs to
    the layers of any Blip2 class, never the embeddings)."""
    return _WORD_EMBEDDINGS in state


def has_text_ffn(state: dict[str, Tensor], prefix: str = "qformer.") -> bool:
    """Whether the Q-Former layers in ``state`` have text FFNs (``encoder.layer.{i}.intermediate.*``);
    ``prefix`` is ``""`` for a bare ``Blip2QFormerModel``."""
    return any(k.startswith(f"{prefix}encoder.layer.") and ".intermediate.dense." in k for k in state)


def hf_state_to_ours(state: dict[str, Tensor], report: ConversionReport) -> dict[str, tuple[str, Tensor]]:
    """Every tensor of a full Blip2 state dict (any Blip2 class) under our names, for a model that
    is already built (:func:`qformer_lightning.convert.load_into`).

    What the checkpoint holds is mapped, whatever it is: vision, Q-Former (with text FFNs and
    embeddings if present), ITC/ITM heads, and the language side
    (``language_projection.*`` -> ``projection.*``, ``language_model.*`` -> ``llm.model.*``).
    Keys no rule covers go to ``report.unexpected``.

    Raises:
        CheckpointError: not a full Hugging Face Blip2 state dict (a bare ``Blip2QFormerModel``
            has no names in a full model: build it with :func:`~qformer_lightning.convert.load_pretrained`).
    """
    kind = detect_hf_kind(state)
    if kind == "qformer":
        raise CheckpointError(
            f"{report.source} is a bare Blip2QFormerModel checkpoint: build a QFormer from it with "
            "qformer_lightning.convert.load_pretrained"
        )
    _note_key_bias(state, report)
    rest, language = split_hf_state_dict(state)
    mapped = retrieval_keymap().to_ours(rest, report)
    mapped.update(rename_prefixes(language, LANGUAGE_NAMES, report))
    return mapped


def detect_hf_kind(state: dict[str, Tensor]) -> str:
    """``"retrieval"``, ``"generation"``, ``"vision_qformer"`` or ``"qformer"`` from the key names.

    Raises:
        CheckpointError: none of the Hugging Face Blip2 layouts (a LAVIS ``.pth`` is named as such).
    """
    keys = set(state)
    if any(k.startswith("Qformer.bert.") or k.startswith("visual_encoder.") for k in keys):
        raise CheckpointError("this is a LAVIS state dict (Qformer.bert.*, visual_encoder.*): use qformer_lightning.convert.lavis")
    if "query_tokens" in keys and any(k.startswith("qformer.encoder.layer.") for k in keys):
        if any(k.startswith(LANGUAGE_PREFIXES) for k in keys):
            return "generation"
        if "embeddings.word_embeddings.weight" in keys:
            return "retrieval"
        return "vision_qformer"
    if "layernorm.weight" in keys and any(k.startswith("encoder.layer.") for k in keys):
        return "qformer"
    sample = sorted(keys)[:5]
    raise CheckpointError(f"not a Hugging Face Blip2 checkpoint (no query_tokens / qformer.encoder.layer.*); keys start {sample}")


# ----------------------------------------------------------------------------- building


def _sub_config(config: Any, name: str) -> Any:
    return getattr(config, name) if hasattr(config, name) else config


def _check_gelu(act: Any, where: str) -> None:
    if act != "gelu":
        raise CheckpointError(f"{where}.hidden_act is {act!r}; our modules use exact GELU ('gelu')")


def build_vision_from_hf_config(
    vision_config: Any, image_size: int | None = None, frozen: bool = True
) -> TimmVisionEncoder:
    """Our EVA image encoder shaped like a Hugging Face ``Blip2VisionConfig``.

    The checkpoint's blocks are the kept ones (``num_removed_blocks=0``, ``depth`` =
    ``num_hidden_layers``); the block norms and ``ln_vision`` take ``layer_norm_eps``.

    Args:
        vision_config: ``Blip2VisionConfig``.
        image_size: resolution to build for (position embeddings are resampled when it differs
            from the checkpoint's); default the config's.
        frozen: freeze the ViT.
    """
    _check_gelu(vision_config.hidden_act, "vision_config")
    size = vision_config.image_size if image_size is None else image_size
    patch = vision_config.patch_size
    if not isinstance(size, int) or not isinstance(patch, int):
        raise CheckpointError(f"only square images/patches are supported, got image_size={size}, patch_size={patch}")
    args = dict(
        model_name=EVA_MODEL_NAME,
        image_size=size,
        num_removed_blocks=0,
        ln_vision_eps=float(vision_config.layer_norm_eps),
        frozen=frozen,
        model_kwargs=dict(
            embed_dim=vision_config.hidden_size,
            depth=vision_config.num_hidden_layers,
            num_heads=vision_config.num_attention_heads,
            mlp_ratio=mlp_ratio_for(vision_config.hidden_size, vision_config.intermediate_size),
            patch_size=patch,
            qkv_bias=bool(vision_config.qkv_bias),
        ),
    )
    return build_vision(args, norm_eps=float(vision_config.layer_norm_eps))


def build_qformer_from_hf_config(config: Any, num_query_tokens: int | None = None, text: bool | None = None) -> QFormer:
    """Our :class:`QFormer` shaped like a Hugging Face Blip2 config.

    Args:
        config: ``Blip2Config`` (its ``qformer_config`` and ``num_query_tokens``) or a bare
            ``Blip2QFormerConfig``.
        num_query_tokens: Q for a bare ``Blip2QFormerConfig`` (default 32).
        text: build the text embeddings and text FFNs. The loaders decide it from the weights
            (:func:`has_text_embeddings`); None takes the config's ``use_qformer_text_input``,
            which a ``Blip2ForConditionalGeneration`` may set without having text embeddings.
    """
    qc = _sub_config(config, "qformer_config")
    _check_gelu(qc.hidden_act, "qformer_config")
    queries = getattr(config, "num_query_tokens", None) or num_query_tokens or 32
    return QFormer(
        num_layers=qc.num_hidden_layers,
        hidden_size=qc.hidden_size,
        num_heads=qc.num_attention_heads,
        intermediate_size=qc.intermediate_size,
        num_query_tokens=queries,
        cross_attention_freq=qc.cross_attention_frequency,
        vision_width=qc.encoder_hidden_size,
        vocab_size=qc.vocab_size,
        max_position_embeddings=qc.max_position_embeddings,
        layer_norm_eps=float(qc.layer_norm_eps),
        dropout=float(qc.hidden_dropout_prob),
        attention_dropout=float(qc.attention_probs_dropout_prob),
        text_ffn=bool(qc.use_qformer_text_input) if text is None else text,
        initializer_range=float(qc.initializer_range),
        pad_token_id=qc.pad_token_id if qc.pad_token_id is not None else 0,
    )


def build_from_hf_config(config: Any, image_size: int | None = None, frozen_vision: bool = True) -> Blip2QFormerModel:
    """Our stage-1 model shaped like a Hugging Face ``Blip2Config`` with Q-Former text input.

    Args:
        config: ``Blip2Config`` whose ``qformer_config.use_qformer_text_input`` is True
            (``Blip2ForImageTextRetrieval``).
        image_size: see :func:`build_vision_from_hf_config`.
        frozen_vision: freeze the ViT.

    Raises:
        CheckpointError: the config describes a Q-Former without text input (a generative checkpoint).
    """
    if not getattr(config, "qformer_config", None) or not config.qformer_config.use_qformer_text_input:
        raise CheckpointError(
            "the config has no Q-Former text input (use_qformer_text_input=False): it is a generative "
            "Blip2 checkpoint; load its vision + Q-Former as a VisionQFormer (convert.load_pretrained)"
        )
    vision = build_vision_from_hf_config(config.vision_config, image_size, frozen_vision)
    qformer = build_qformer_from_hf_config(config, text=True)
    return Blip2QFormerModel(
        vision,
        qformer,
        embed_dim=config.image_text_hidden_size,
        vocab_size=config.qformer_config.vocab_size,
        tie_lm_head=True,
    )


def build_parts_from_hf_config(
    config: Any, image_size: int | None = None, frozen_vision: bool = True, text: bool | None = None
) -> VisionQFormer:
    """Vision + Q-Former shaped like any Hugging Face ``Blip2Config``; the language side is filled
    in by the loader.

    Args:
        config: ``Blip2Config``.
        image_size: see :func:`build_vision_from_hf_config`.
        frozen_vision: freeze the ViT.
        text: Q-Former text parts; see :func:`build_qformer_from_hf_config`.
    """
    vision = build_vision_from_hf_config(config.vision_config, image_size, frozen_vision)
    text_config = getattr(config, "text_config", None)
    qformer = build_qformer_from_hf_config(config, text=text)
    return VisionQFormer(vision, qformer, language_config=text_config.to_dict() if text_config else None)


# ----------------------------------------------------------------------------- loading


def _note_key_bias(state: dict[str, Tensor], report: ConversionReport) -> None:
    for key, tensor in state.items():
        if key.endswith("self_attn.qkv.bias"):
            k_bias = tensor.chunk(3)[1]
            if k_bias.abs().max() > 0:
                report.notes.append(f"{key}: non-zero key bias dropped (it cannot change attention outputs)")


def _drop_text_parts(state: dict[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    """``state`` without the Q-Former text embeddings and text FFNs, which go to ``report.ignored``
    (a Q-Former without text parts has no place for them)."""
    text = {k for k in state if _TEXT_PARTS.match(k)}
    if text:
        report.ignored.extend(sorted(text))
        report.notes.append(
            f"{len(text)} Q-Former text tensors (text FFNs/embeddings) ignored: the Q-Former is built "
            "without text parts"
            + ("" if has_text_embeddings(state) else " (the checkpoint has no text embeddings to feed its text FFNs)")
        )
    return {k: v for k, v in state.items() if k not in text}


def load_hf_state_dict(
    model: Blip2QFormerModel | VisionQFormer | QFormer,
    state: dict[str, Tensor],
    source: str = "<state_dict>",
    strict: bool = True,
) -> ConversionReport:
    """Copy a Hugging Face Blip2 state dict into one of our modules.

    Args:
        model: :class:`Blip2QFormerModel` (from ``Blip2ForImageTextRetrieval``),
            :class:`VisionQFormer` (any full Blip2 checkpoint; the language part goes to its
            ``language_state``) or a bare :class:`QFormer` (from ``Blip2QFormerModel``).
        state: the checkpoint tensors.
        source: named in the report and in errors.
        strict: fail on unexpected keys and on missing keys beyond those Hugging Face never has
            (``temp``, ``lm_head.*``; ``query_tokens``/text embeddings for a bare Q-Former).

    Returns:
        The report: loaded/missing/unexpected/resampled/ignored names.

    Raises:
        CheckpointError: wrong kind of checkpoint, wrong shapes (key and both shapes named), or a
            strict load with missing/unexpected keys.
    """
    kind = detect_hf_kind(state)
    report = ConversionReport(source=str(source), kind=f"hf:{kind}")
    _note_key_bias(state, report)
    allowed: tuple[str, ...] = ()
    if isinstance(model, Blip2QFormerModel):
        if kind != "retrieval":
            raise CheckpointError(
                f"{source} is a Hugging Face Blip2 '{kind}' checkpoint without the Q-Former text embeddings and "
                "ITC/ITM heads; build a VisionQFormer from it (convert.load_pretrained) or fill a built model "
                "with what it has (convert.load_into)"
            )
        keymap, allowed = retrieval_keymap(), _NOT_IN_HF
        report.notes.append(
            "Hugging Face drops temp and the Q-Former LM head: temp keeps its initial value "
            f"{model.temp.detach().item():.4g}, the LM head stays initialised"
            + (" with its decoder tied to the word embeddings" if model.lm_head_tied else "")
        )
    elif isinstance(model, VisionQFormer):
        if kind == "qformer":
            raise CheckpointError(f"{source} is a bare Blip2QFormerModel checkpoint (no vision): load it into a QFormer")
        state, language = split_hf_state_dict(state)
        model.language_state = language
        if language:
            report.notes.append(f"{len(language)} language tensors kept under their own names in language_state")
        keymap = parts_keymap(model.qformer.has_text)
        if kind == "retrieval":
            drop = ("vision_projection.", "text_projection.", "itm_head.")
            report.ignored.extend(k for k in state if k.startswith(drop))
            state = {k: v for k, v in state.items() if not k.startswith(drop)}
        if not model.qformer.has_text:
            state = _drop_text_parts(state, report)
    elif isinstance(model, QFormer):
        if kind != "qformer":
            raise CheckpointError(f"{source} is a full Blip2 '{kind}' checkpoint: load it into a VisionQFormer")
        keymap, allowed = bare_qformer_keymap(model.has_text), ("query_tokens", "word_embeddings.*", "position_embeddings.*")
        report.notes.append("a bare Blip2QFormerModel has no query tokens or text embeddings: ours stay initialised")
    else:
        raise TypeError(f"cannot load a Hugging Face Blip2 checkpoint into {type(model).__name__}")
    mapped = keymap.to_ours(state, report)
    return load_checked(model, mapped, report, allowed_missing=allowed, resample=("vision.vit.pos_embed",), strict=strict)


def _architecture(config: Any) -> str:
    """``config.architectures[0]`` if recorded, else the model type."""
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def build_and_load_hf(
    config: Any,
    state: dict[str, Tensor],
    source: str = "<state_dict>",
    image_size: int | None = None,
    frozen_vision: bool = True,
    strict: bool = True,
) -> tuple[Blip2QFormerModel | VisionQFormer | QFormer, ConversionReport]:
    """Build the module a Hugging Face checkpoint's weights describe and load them into it.

    - ``Blip2QFormerModel`` (``model_type`` ``blip_2_qformer``) -> a bare :class:`QFormer`, with
      text FFNs if its layers have them;
    - a full Blip2 holding the Q-Former text embeddings (``Blip2ForImageTextRetrieval``) ->
      :class:`Blip2QFormerModel`;
    - any other full Blip2 (``Blip2ForConditionalGeneration``, ``Blip2Model``) ->
      :class:`VisionQFormer` without Q-Former text parts: ``use_qformer_text_input`` gives these
      classes text FFNs but no text embeddings, so the text FFNs cannot be used and are ignored (noted).

    Args:
        config: the checkpoint's config (``Blip2Config`` or ``Blip2QFormerConfig``).
        state: its tensors.
        source: named in the report and in errors.
        image_size: resolution to run at (position embeddings resampled when it differs).
        frozen_vision: freeze the ViT.
        strict: see :func:`load_hf_state_dict`.

    Raises:
        CheckpointError: a model type other than Blip2, or see :func:`load_hf_state_dict`.
    """
    model_type = getattr(config, "model_type", "")
    model: Blip2QFormerModel | VisionQFormer | QFormer
    if model_type == "blip_2_qformer":
        model = build_qformer_from_hf_config(config, text=has_text_ffn(state, prefix=""))
    elif model_type != "blip-2":
        raise CheckpointError(f"{source} holds a {model_type} model, not Blip2")
    elif detect_hf_kind(state) == "retrieval":
        model = build_from_hf_config(config, image_size, frozen_vision)
    else:
        model = build_parts_from_hf_config(config, image_size, frozen_vision, text=has_text_embeddings(state))
    report = load_hf_state_dict(model, state, source, strict)
    report.kind = f"hf:{_architecture(config)}"
    return model, report


def load_hf_retrieval(
    source: str | Path, image_size: int | None = None, frozen_vision: bool = True, strict: bool = True
) -> tuple[Blip2QFormerModel, ConversionReport]:
    """Build and load our stage-1 model from a ``Blip2ForImageTextRetrieval`` directory or hub id.

    Args:
        source: ``save_pretrained`` directory or hub id (``Salesforce/blip2-itm-vit-g``).
        image_size: resolution to run at (position embeddings resampled when it differs).
        frozen_vision: freeze the ViT.
        strict: see :func:`load_hf_state_dict`.

    Raises:
        CheckpointError: another model type, or a Blip2 checkpoint without the Q-Former text
            embeddings and ITC/ITM heads (a generative one).
    """
    ckpt = read_hf_checkpoint(source, skip_prefixes=LANGUAGE_PREFIXES)
    if getattr(ckpt.config, "model_type", "") != "blip-2":
        raise CheckpointError(
            f"{ckpt.source} holds a {ckpt.architecture} ({ckpt.config.model_type}), not a full Blip2 model"
        )
    if detect_hf_kind(ckpt.state) != "retrieval":
        raise CheckpointError(
            f"{ckpt.source} ({ckpt.architecture}) has no Q-Former text embeddings and ITC/ITM heads: load its "
            "vision + Q-Former as a VisionQFormer (qformer_lightning.convert.load_pretrained)"
        )
    model, report = build_and_load_hf(ckpt.config, ckpt.state, ckpt.source, image_size, frozen_vision, strict)
    assert isinstance(model, Blip2QFormerModel)
    return model, report


# ----------------------------------------------------------------------------- export


def hf_config_from_model(model: Blip2QFormerModel, report: ConversionReport | None = None) -> Any:
    """A ``Blip2Config`` (retrieval flavour: Q-Former text input, no image tokens) describing ``model``.

    Hugging Face uses one eps for the ViT block norms and ``post_layernorm``; when ours differ
    (LAVIS: 1e-6 and 1e-5) the block eps is written and a note added to ``report``.
    """
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vision, qformer = model.vision, model.qformer
    check_eva(vision, "Hugging Face Blip2")
    block = vision.vit.blocks[0]
    eps = vit_norm_eps(vision)
    if report is not None and abs(float(vision.ln_vision.eps) - eps) > 0:
        report.notes.append(
            f"Hugging Face has one vision eps: wrote the ViT blocks' {eps:g}; ln_vision used {vision.ln_vision.eps:g}"
        )
    vision_config = Blip2VisionConfig(
        hidden_size=vision.width,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vision.vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu",
        layer_norm_eps=eps,
        qkv_bias=block.attn.q_bias is not None,
    )
    layer = qformer.layers[0]
    assert qformer.word_embeddings is not None and qformer.position_embeddings is not None
    qformer_config = Blip2QFormerConfig(
        vocab_size=qformer.word_embeddings.num_embeddings,
        hidden_size=qformer.hidden_size,
        num_hidden_layers=len(qformer.layers),
        num_attention_heads=layer.self_attn.num_heads,
        intermediate_size=layer.query_ffn.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=float(qformer.embed_dropout.p),
        attention_probs_dropout_prob=float(layer.self_attn.attention_dropout),
        max_position_embeddings=qformer.position_embeddings.num_embeddings,
        initializer_range=qformer.initializer_range,
        layer_norm_eps=float(qformer.embed_norm.eps),
        pad_token_id=qformer.word_embeddings.padding_idx,
        cross_attention_frequency=qformer.cross_attention_freq,
        encoder_hidden_size=vision.width,
        use_qformer_text_input=True,
    )
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        num_query_tokens=qformer.num_query_tokens,
        image_text_hidden_size=model.vision_proj.out_features,
        image_token_index=None,
    )
    config.architectures = ["Blip2ForImageTextRetrieval"]
    return config


def export_hf_state_dict(model: Blip2QFormerModel, report: ConversionReport | None = None) -> dict[str, Tensor]:
    """Our stage-1 model -> ``Blip2ForImageTextRetrieval`` state dict (``temp`` and the LM head are
    not part of it and are listed in ``report.notes``)."""
    check_eva(model.vision, "Hugging Face Blip2")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out, unmatched = retrieval_keymap().to_theirs(state)
    if report is not None and unmatched:
        report.notes.append(f"not representable in Hugging Face Blip2, not written: {sorted(unmatched)}")
    return {k: v.contiguous() for k, v in out.items()}


def export_hf_retrieval(model: Blip2QFormerModel, out_dir: str | Path, max_shard_size: str = "5GB") -> ConversionReport:
    """Write ``model`` as a directory that ``Blip2ForImageTextRetrieval.from_pretrained`` loads
    (config.json + safetensors, sharded above ``max_shard_size``).

    Returns:
        The report; ``loaded`` lists the checkpoint keys written.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(source="model", kind="export:hf:Blip2ForImageTextRetrieval")
    config = hf_config_from_model(model, report)
    state = export_hf_state_dict(model, report)
    config.save_pretrained(str(out))
    save_torch_state_dict(state, str(out), max_shard_size=max_shard_size)
    report.loaded.extend(sorted(state))
    log.info("wrote %d tensors to %s", len(state), out)
    return report
