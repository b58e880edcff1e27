"""Salesforce LAVIS BLIP-2 ``.pth`` checkpoints <-> our modules.

Glossary: D Q-Former width, Dv vision width, V vocabulary.

LAVIS layout (``lavis/models/blip2_models``; a checkpoint file is ``{"model": state_dict, ...}``):

- ``visual_encoder.*``: LAVIS's EVA ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.{norm1, attn.q_bias, attn.v_bias, attn.qkv.weight, attn.proj, norm2, mlp.fc1, mlp.fc2}``;
  block LayerNorm eps 1e-6; the last EVA block already removed). The names are timm's ``Eva``
  names, so they map one to one onto ``vision.vit.*``. LAVIS drops frozen parameters when it
  saves, so pretraining checkpoints usually have no ``visual_encoder.*`` at all.
- ``ln_vision`` (eps 1e-5) -> ``vision.ln_vision``.
- ``Qformer.bert.embeddings.{word_embeddings, position_embeddings, LayerNorm}`` (+ the
  ``position_ids`` buffer) -> ``qformer.{word_embeddings, position_embeddings, embed_norm}``.
- ``Qformer.bert.encoder.layer.{i}.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
  crossattention.self.*, crossattention.output.*, intermediate.dense, output.{dense,LayerNorm},
  intermediate_query.dense, output_query.{dense,LayerNorm}}`` -> ``qformer.layers.{i}.*`` (query/key/value
  fused into ``qkv_proj``, cross key/value into ``kv_proj``).
- ``Qformer.cls.predictions.{transform.dense, transform.LayerNorm, decoder.weight, bias}`` (and
  ``decoder.bias``, the same tensor as ``bias``) -> ``lm_head.{dense, norm, decoder}``.
- ``query_tokens``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` -> ours
  (``itm_head`` -> ``itm_head.linear``).
- ``opt_proj``/``t5_proj`` (stage 2): the language side, kept under its own names.

Stage-2 models (``blip2_opt``, ``blip2_t5``) delete the Q-Former's text embeddings, text FFNs and
LM head before saving; they load into :class:`~qformer_lightning.convert.parts.VisionQFormer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer_lightning.convert.keymap import KeyMap, bert_layer_rules, eva_block_rules, rename, rename_prefixes
from qformer_lightning.convert.modules import EVA_MODEL_NAME, build_vision, check_eva, mlp_ratio_for
from qformer_lightning.convert.parts import VisionQFormer
from qformer_lightning.convert.report import CheckpointError, ConversionReport, load_checked
from qformer_lightning.convert.torch_file import load_torch_file
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

log = logging.getLogger(__name__)

LANGUAGE_PREFIXES = ("opt_proj.", "t5_proj.", "llm_proj.", "opt_model.", "t5_model.", "llm_model.")
"""Key prefixes of the language side of a LAVIS stage-2 checkpoint."""
LANGUAGE_NAMES = {"opt_proj.": "projection.", "t5_proj.": "projection.", "llm_proj.": "projection."}
"""LAVIS's query-to-LLM projection -> ours (:class:`~qformer_lightning.models.blip2_llm.Blip2LLMModel`'s
``projection``); LAVIS saves no LLM weights of its own (``opt_model.*`` and the like stay unused)."""

LAVIS_VIT_NORM_EPS = 1e-6
LAVIS_LN_VISION_EPS = 1e-5
LAVIS_QFORMER_EPS = 1e-12

_Q = "Qformer.bert"
_CLS = "Qformer.cls.predictions"
_DECODER_BIAS_COPY = f"{_CLS}.decoder.bias"
_POSITION_IDS = f"{_Q}.embeddings.position_ids"


def lavis_keymap(text: bool = True, heads: bool = True, vision: bool = True) -> KeyMap:
    """LAVIS names <-> ours.

    Args:
        text: Q-Former text embeddings, text FFNs and LM head (stage 1).
        heads: ITC/ITM heads and ``temp`` (our :class:`Blip2QFormerModel`).
        vision: the ``visual_encoder.*`` tensors.
    """
    rules = [rename("vision.ln_vision.{p}", "ln_vision.{p}")]
    if vision:
        rules += eva_block_rules("vision.vit", "visual_encoder")
    rules += [
        rename("qformer.query_tokens", "query_tokens"),
        rename("qformer.embed_norm.{p}", f"{_Q}.embeddings.LayerNorm.{{p}}"),
    ]
    rules += bert_layer_rules("qformer.layers.{i}", f"{_Q}.encoder.layer.{{i}}", attn="self", text_ffn=text)
    if text:
        rules += [
            rename("qformer.word_embeddings.weight", f"{_Q}.embeddings.word_embeddings.weight"),
            rename("qformer.position_embeddings.weight", f"{_Q}.embeddings.position_embeddings.weight"),
        ]
    if text and heads:
        rules += [
            rename("lm_head.dense.{p}", f"{_CLS}.transform.dense.{{p}}"),
            rename("lm_head.norm.{p}", f"{_CLS}.transform.LayerNorm.{{p}}"),
            rename("lm_head.decoder.weight", f"{_CLS}.decoder.weight"),
            rename("lm_head.decoder.bias", f"{_CLS}.bias"),
        ]
    if heads:
        rules += [
            rename("vision_proj.{p}", "vision_proj.{p}"),
            rename("text_proj.{p}", "text_proj.{p}"),
            rename("itm_head.linear.{p}", "itm_head.{p}"),
            rename("temp", "temp"),
        ]
    return KeyMap(rules, ignore=(_POSITION_IDS,))


# ----------------------------------------------------------------------------- reading


def unwrap_lavis_state(obj: Any, source: str = "<object>") -> dict[str, Tensor]:
    """The state dict inside a LAVIS checkpoint object (``{"model": state_dict, ...}``) or the object itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: not a state dict nor a LAVIS checkpoint {{'model': state_dict}}")
    return obj


def read_lavis_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a LAVIS ``.pth`` and return its model state dict.

    Args:
        path: the file.
        trust_pickle: allow arbitrary pickled objects (``weights_only=False``); only for files you trust.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFileError: an empty, truncated or corrupt file, or not a torch file.
        CheckpointError: the file holds objects a weights-only load refuses, or no state dict.
    """
    obj = load_torch_file(path, "LAVIS checkpoint", weights_only=not trust_pickle)
    return unwrap_lavis_state(obj, str(path))


def is_lavis_state(state: dict[str, Tensor]) -> bool:
    """Whether a state dict has LAVIS BLIP-2 names (``Qformer.bert.*``)."""
    return any(k.startswith(f"{_Q}.") for k in state)


def _check_lavis(state: dict[str, Tensor], source: str) -> None:
    if not is_lavis_state(state):
        hint = " (it looks like a Hugging Face Blip2 state dict: use convert.hf)" if any(
            k.startswith(("vision_model.", "qformer.")) for k in state
        ) else ""
        raise CheckpointError(f"{source}: not a LAVIS BLIP-2 state dict, no key starts with '{_Q}.'{hint}")


# ----------------------------------------------------------------------------- building


def _layer_indices(state: dict[str, Tensor], prefix: str, marker: str) -> list[int]:
    found = set()
    for key in state:
        if key.startswith(prefix):
            rest = key[len(prefix):].split(".")
            if rest[0].isdigit() and (not marker or ".".join(rest[1:]).startswith(marker)):
                found.add(int(rest[0]))
    return sorted(found)


def _vision_args_from_state(
    state: dict[str, Tensor], image_size: int | None, num_heads: int | None, frozen: bool, ln_vision_eps: float
) -> dict[str, Any]:
    """TimmVisionEncoder arguments read off ``visual_encoder.*`` shapes."""
    pos = state["visual_encoder.pos_embed"]  # (1, 1 + G*G, Dv)
    width = pos.shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5)
    depth = len(_layer_indices(state, "visual_encoder.blocks.", ""))
    mlp = state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    heads = num_heads or (16 if width == 1408 else max(1, width // 64))
    return dict(
        model_name=EVA_MODEL_NAME,
        image_size=image_size or grid * patch,
        num_removed_blocks=0,
        ln_vision_eps=ln_vision_eps,
        frozen=frozen,
        model_kwargs=dict(
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio_for(width, mlp),
            patch_size=patch,
            qkv_bias="visual_encoder.blocks.0.attn.q_bias" in state,
        ),
    )


def _qformer_from_state(state: dict[str, Tensor], num_heads: int | None, layer_norm_eps: float) -> QFormer:
    """A QFormer shaped like ``Qformer.bert.*`` + ``query_tokens``."""
    queries = state["query_tokens"]  # (1, Q, D)
    hidden = queries.shape[-1]
    prefix = f"{_Q}.encoder.layer."
    layers = _layer_indices(state, prefix, "")
    cross = _layer_indices(state, prefix, "crossattention.")
    if not layers or not cross or cross[0] != 0:
        raise CheckpointError(f"LAVIS Q-Former layout not recognised: layers {layers}, cross-attention in {cross}")
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise CheckpointError(f"cross-attention layers {cross} are not every {freq}-th layer of {len(layers)}")
    text = f"{_Q}.embeddings.word_embeddings.weight" in state
    args: dict[str, Any] = dict(
        num_layers=len(layers),
        hidden_size=hidden,
        num_heads=num_heads or max(1, hidden // 64),
        intermediate_size=state[f"{prefix}0.intermediate_query.dense.weight"].shape[0],
        num_query_tokens=queries.shape[1],
        cross_attention_freq=freq,
        vision_width=state[f"{prefix}0.crossattention.self.key.weight"].shape[1],
        layer_norm_eps=layer_norm_eps,
        text_ffn=text,
    )
    if text:
        args["vocab_size"] = state[f"{_Q}.embeddings.word_embeddings.weight"].shape[0]
        args["max_position_embeddings"] = state[f"{_Q}.embeddings.position_embeddings.weight"].shape[0]
    return QFormer(**args)


def build_from_lavis_state_dict(
    state: dict[str, Tensor],
    image_size: int | None = None,
    vision: TimmVisionEncoder | None = None,
    vision_num_heads: int | None = None,
    qformer_num_heads: int | None = None,
    frozen_vision: bool = True,
    vit_norm_eps: float = LAVIS_VIT_NORM_EPS,
    ln_vision_eps: float = LAVIS_LN_VISION_EPS,
    qformer_layer_norm_eps: float = LAVIS_QFORMER_EPS,
) -> Blip2QFormerModel | VisionQFormer:
    """Build (without loading) the modules a LAVIS state dict describes.

    Head counts are not recorded in a state dict: by default the Q-Former has D/64 heads
    (BERT-base: 12) and the ViT 16 heads at width 1408 (EVA ViT-g), D/64 otherwise.

    Args:
        state: the LAVIS state dict.
        image_size: resolution to build for; default the checkpoint's position-embedding grid.
        vision: an image encoder to use when the checkpoint has no ``visual_encoder.*`` (LAVIS
            drops frozen weights); without one, EVA ViT-g (timm ``eva_giant_patch14_clip_224``,
            last block removed, random weights) is built and a note says so.
        vision_num_heads: ViT heads.
        qformer_num_heads: Q-Former heads.
        frozen_vision: freeze the ViT.
        vit_norm_eps: eps of the ViT block norms (LAVIS 1e-6).
        ln_vision_eps: eps of ``ln_vision`` (LAVIS 1e-5).
        qformer_layer_norm_eps: eps of the Q-Former norms (BERT 1e-12).

    Returns:
        :class:`Blip2QFormerModel` for a stage-1 checkpoint (Q-Former text parts and ITC/ITM
        heads), else :class:`VisionQFormer`.
    """
    _check_lavis(state, "state dict")
    if "visual_encoder.pos_embed" in state:
        args = _vision_args_from_state(state, image_size, vision_num_heads, frozen_vision, ln_vision_eps)
        vision = build_vision(args, norm_eps=vit_norm_eps)
    elif vision is None:
        vision = TimmVisionEncoder(
            EVA_MODEL_NAME, image_size=image_size or 224, num_removed_blocks=1, ln_vision_eps=ln_vision_eps, frozen=frozen_vision
        )
        log.warning("the LAVIS state dict has no visual_encoder.*: built EVA ViT-g with random weights")
    qformer = _qformer_from_state(state, qformer_num_heads, qformer_layer_norm_eps)
    if qformer.has_text and "vision_proj.weight" in state:
        decoder = state.get(f"{_CLS}.decoder.weight")
        tied = decoder is None or torch.equal(decoder, state[f"{_Q}.embeddings.word_embeddings.weight"])
        return Blip2QFormerModel(
            vision,
            qformer,
            embed_dim=state["vision_proj.weight"].shape[0],
            vocab_size=qformer.word_embeddings.num_embeddings,  # type: ignore[union-attr]
            tie_lm_head=tied,
        )
    return VisionQFormer(vision, qformer)


# ----------------------------------------------------------------------------- loading


def load_lavis_state_dict(
    model: Blip2QFormerModel | VisionQFormer,
    state: dict[str, Tensor],
    source: str = "<state_dict>",
    strict: bool = True,
) -> ConversionReport:
    """Copy a LAVIS state dict into our modules.

    A checkpoint without ``visual_encoder.*`` (LAVIS drops frozen weights) leaves our ViT as it
    is, reported as missing but allowed. The LM decoder is loaded untied when the model's head
    is untied; into a tied model the checkpoint's decoder must equal its word embeddings.

    Args:
        model: :class:`Blip2QFormerModel` (stage-1 checkpoints) or :class:`VisionQFormer`
            (any; the language side ``opt_proj``/``t5_proj`` goes to ``language_state``).
        state: the state dict (or the ``{"model": ...}`` checkpoint object).
        source: named in the report and errors.
        strict: fail on unexpected keys and on missing keys (beyond an absent ViT).

    Raises:
        CheckpointError: not a LAVIS state dict, wrong shapes, a stage-2 checkpoint into the
            stage-1 model, or a strict load with missing/unexpected keys.
    """
    state = dict(unwrap_lavis_state(state, source))
    _check_lavis(state, source)
    report = ConversionReport(source=str(source), kind="lavis")
    has_text = f"{_Q}.embeddings.word_embeddings.weight" in state
    language = {k: v for k, v in state.items() if k.startswith(LANGUAGE_PREFIXES)}
    state = {k: v for k, v in state.items() if not k.startswith(LANGUAGE_PREFIXES)}
    _drop_decoder_bias_copy(state, report)
    if isinstance(model, Blip2QFormerModel):
        if not has_text:
            raise CheckpointError(
                f"{source} is a LAVIS stage-2 checkpoint (no Q-Former text embeddings/FFNs/LM head): load it into a "
                "VisionQFormer"
            )
        keymap = lavis_keymap(text=True, heads=True)
        report.unexpected.extend(sorted(language))
    elif isinstance(model, VisionQFormer):
        keymap = lavis_keymap(text=model.qformer.has_text, heads=False)
        model.language_state = language
        if language:
            report.notes.append(f"{len(language)} language tensors kept under their own names in language_state")
        drop = ("vision_proj.", "text_proj.", "itm_head.", "temp", f"{_CLS}.")
        report.ignored.extend(sorted(k for k in state if k.startswith(drop)))
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    else:
        raise TypeError(f"cannot load a LAVIS checkpoint into {type(model).__name__}")
    allowed = () if _note_absent_vision(state, report) else ("vision.vit.*",)
    mapped = keymap.to_ours(state, report)
    return load_checked(model, mapped, report, allowed_missing=allowed, resample=("vision.vit.pos_embed",), strict=strict)


def _drop_decoder_bias_copy(state: dict[str, Tensor], report: ConversionReport) -> None:
    """Remove ``Qformer.cls.predictions.decoder.bias`` from ``state`` (in place) after checking that
    it equals ``...predictions.bias`` (one tensor in LAVIS); listed in ``report.ignored``."""
    if _DECODER_BIAS_COPY not in state:
        return
    copy = state.pop(_DECODER_BIAS_COPY)
    if f"{_CLS}.bias" in state and not torch.equal(copy, state[f"{_CLS}.bias"]):
        raise CheckpointError(
            f"{report.source}: {_DECODER_BIAS_COPY} differs from {_CLS}.bias (they are one tensor in LAVIS)"
        )
    report.ignored.append(_DECODER_BIAS_COPY)


def _note_absent_vision(state: dict[str, Tensor], report: ConversionReport) -> bool:
    """Whether ``state`` has ``visual_encoder.*``; a note says so when it has not."""
    if any(k.startswith("visual_encoder.") for k in state):
        return True
    report.notes.append("no visual_encoder.* in the checkpoint (LAVIS drops frozen weights): the ViT keeps its weights")
    return False


def lavis_state_to_ours(state: dict[str, Tensor], report: ConversionReport) -> dict[str, tuple[str, Tensor]]:
    """Every tensor of a LAVIS state dict (stage 1 or 2) under our names, for a model that is already
    built (:func:`qformer_lightning.convert.load_into`).

    What the checkpoint holds is mapped, whatever it is: ViT, ``ln_vision``, Q-Former (with its
    text parts if present), ITC/ITM heads, ``temp``, the LM head, and the projection
    (``opt_proj.*``/``t5_proj.*``/``llm_proj.*`` -> ``projection.*``). Keys no rule covers go to
    ``report.unexpected``.

    Raises:
        CheckpointError: not a LAVIS state dict, or a decoder bias that differs from its copy.
    """
    state = dict(unwrap_lavis_state(state, report.source))
    _check_lavis(state, report.source)
    language = {k: v for k, v in state.items() if k.startswith(LANGUAGE_PREFIXES)}
    state = {k: v for k, v in state.items() if not k.startswith(LANGUAGE_PREFIXES)}
    _drop_decoder_bias_copy(state, report)
    _note_absent_vision(state, report)
    mapped = lavis_keymap(text=True, heads=True).to_ours(state, report)
    mapped.update(rename_prefixes(language, LANGUAGE_NAMES, report))
    return mapped


def load_lavis(
    path: str | Path,
    image_size: int | None = None,
    vision: TimmVisionEncoder | None = None,
    frozen_vision: bool = True,
    strict: bool = True,
    trust_pickle: bool = False,
    **build_kwargs: Any,
) -> tuple[Blip2QFormerModel | VisionQFormer, ConversionReport]:
    """Read, build and load a LAVIS checkpoint file (see :func:`build_from_lavis_state_dict` for
    ``build_kwargs`` such as head counts)."""
    state = read_lavis_checkpoint(path, trust_pickle)
    model = build_from_lavis_state_dict(state, image_size, vision, frozen_vision=frozen_vision, **build_kwargs)
    return model, load_lavis_state_dict(model, state, str(path), strict)


# ----------------------------------------------------------------------------- export


def export_lavis_state_dict(model: Blip2QFormerModel | VisionQFormer, include_vision: bool = True) -> dict[str, Tensor]:
    """Our model as a LAVIS state dict (what ``torch.load(path)["model"]`` holds).

    Adds what LAVIS's modules carry beside the weights: the ``position_ids`` buffer and the
    ``decoder.bias`` alias of ``cls.predictions.bias``. A :class:`VisionQFormer` adds the
    LAVIS-named tensors of its ``language_state`` (``opt_proj.*``, ``t5_proj.*``).

    Args:
        model: the model to write.
        include_vision: write ``visual_encoder.*`` (LAVIS itself omits a frozen ViT).
    """
    check_eva(model.vision, "LAVIS EVA ViT")
    stage1 = isinstance(model, Blip2QFormerModel)
    text = model.qformer.has_text
    keymap = lavis_keymap(text=text, heads=stage1, vision=include_vision)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not include_vision:
        state = {k: v for k, v in state.items() if not k.startswith("vision.vit.")}
    out, unmatched = keymap.to_theirs(state)
    if unmatched:
        raise CheckpointError(f"no LAVIS name for {sorted(unmatched)}")
    if text:
        assert model.qformer.position_embeddings is not None
        out[_POSITION_IDS] = torch.arange(model.qformer.position_embeddings.num_embeddings).unsqueeze(0)
    if stage1 and text:
        out[_DECODER_BIAS_COPY] = out[f"{_CLS}.bias"]
    if isinstance(model, VisionQFormer):
        out.update({k: v for k, v in model.language_state.items() if k.startswith(LANGUAGE_PREFIXES)})
    return {k: v.contiguous() for k, v in out.items()}


def save_lavis_checkpoint(model: Blip2QFormerModel | VisionQFormer, path: str | Path, include_vision: bool = True) -> Path:
    """Write ``{"model": export_lavis_state_dict(model)}`` to ``path`` (LAVIS's checkpoint layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": export_lavis_state_dict(model, include_vision)}, path)
    return path
