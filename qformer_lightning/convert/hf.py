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
- ``Blip2QFormerModel``: a bare Q-Former (no query tokens, no text embeddings) -> :class:`QFormer`.

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

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm
from torch import Tensor

from qformer_lightning.convert.keymap import KeyMap, KeyRule, bert_layer_rules, rename
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

LANGUAGE_PREFIXES = ("language_projection.", "language_model.")
"""Key prefixes of the language side of a generative Hugging Face Blip2 checkpoint."""

_IGNORE = ("*position_ids",)
_NOT_IN_HF = ("temp", "lm_head.*")
"""Our parameters that Hugging Face Blip2 checkpoints never hold."""

_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


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
    """``Blip2ForImageTextRetrieval`` <-> :class:`Blip2QFormerModel`."""
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


# ----------------------------------------------------------------------------- reading


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into memory.

    Attributes:
        source: the directory or hub id.
        config: ``Blip2Config`` or ``Blip2QFormerConfig``.
        state: tensor name -> tensor (CPU).
        architecture: ``config.architectures[0]`` if recorded, else the model type.
    """

    source: str
    config: Any
    state: dict[str, Tensor]
    architecture: str


def _offline_error(source: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load {source!r} from the Hugging Face hub ({type(err).__name__}: {err}). Without network "
        "access (or with HF_HUB_OFFLINE=1 and nothing cached), download it where the hub is reachable "
        "(`model.save_pretrained(dir)` or `hf download REPO --local-dir dir`) and pass the local directory."
    )


def _resolve_files(source: str) -> tuple[Path, list[Path]]:
    """The config file and the weight files of a local directory or a hub id (downloaded if needed)."""
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained directory")
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return config, _expand_index(path / name, lambda shard: path / shard)
        raise FileNotFoundError(f"{path} holds none of {list(_WEIGHT_FILES)}")
    if path.exists() or source.count("/") != 1 or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source!r} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = Path(hf_hub_download(source, "config.json"))
    except Exception as err:  # offline, unknown repo, no network: all need the same advice
        raise _offline_error(source, err) from err
    for name in _WEIGHT_FILES:
        try:
            first = Path(hf_hub_download(source, name))
        except LocalEntryNotFoundError as err:
            raise _offline_error(source, err) from err
        except (EntryNotFoundError, OSError):
            continue
        return config, _expand_index(first, lambda shard: Path(hf_hub_download(source, shard)))
    raise FileNotFoundError(f"hub repo {source} holds none of {list(_WEIGHT_FILES)}")


def _expand_index(path: Path, fetch: Any) -> list[Path]:
    """A weight file, or the shards an ``*.index.json`` names."""
    if not path.name.endswith(".index.json"):
        return [path]
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    return [fetch(shard) for shard in shards]


def _skipped(key: str, prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and key.startswith(prefixes)


def _read_weights(files: Iterable[Path], skip_prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    files = list(files)
    for file in tqdm(files, desc="reading weights", unit="file", disable=None if len(files) > 1 else True):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if not _skipped(key, skip_prefixes):
                        state[key] = handle.get_tensor(key)
        else:
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in part.items() if not _skipped(k, skip_prefixes)})
    return state


def read_hf_checkpoint(source: str | Path, skip_prefixes: tuple[str, ...] = ()) -> HFCheckpoint:
    """Read the config and tensors of a ``save_pretrained`` directory or hub id.

    Args:
        source: a local directory (config.json + model.safetensors, sharded safetensors with their
            index, or pytorch_model.bin) or a hub id such as ``Salesforce/blip2-itm-vit-g``.
        skip_prefixes: key prefixes not to read (e.g. :data:`LANGUAGE_PREFIXES` to skip the LLM).

    Raises:
        FileNotFoundError: no such directory, no weights, or the hub is unreachable (the message
            says to pass a local directory).
    """
    from transformers import AutoConfig

    config_file, weight_files = _resolve_files(str(source))
    config = AutoConfig.from_pretrained(str(config_file.parent))
    state = _read_weights(weight_files, tuple(skip_prefixes))
    archs = getattr(config, "architectures", None) or [config.model_type]
    return HFCheckpoint(source=str(source), config=config, state=state, architecture=archs[0])


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


def build_qformer_from_hf_config(config: Any, num_query_tokens: int | None = None) -> QFormer:
    """Our :class:`QFormer` shaped like a Hugging Face Blip2 config.

    Args:
        config: ``Blip2Config`` (its ``qformer_config`` and ``num_query_tokens``) or a bare
            ``Blip2QFormerConfig``.
        num_query_tokens: Q for a bare ``Blip2QFormerConfig`` (default 32).
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
        text_ffn=bool(qc.use_qformer_text_input),
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
            "Blip2 checkpoint; load its vision + Q-Former as a VisionQFormer (load_hf_parts, build_parts_from_hf_config)"
        )
    vision = build_vision_from_hf_config(config.vision_config, image_size, frozen_vision)
    qformer = build_qformer_from_hf_config(config)
    return Blip2QFormerModel(
        vision,
        qformer,
        embed_dim=config.image_text_hidden_size,
        vocab_size=config.qformer_config.vocab_size,
        tie_lm_head=True,
    )


def build_parts_from_hf_config(config: Any, image_size: int | None = None, frozen_vision: bool = True) -> VisionQFormer:
    """Vision + Q-Former shaped like any Hugging Face ``Blip2Config`` (text parts only if the
    config has Q-Former text input); the language side is filled in by the loader."""
    vision = build_vision_from_hf_config(config.vision_config, image_size, frozen_vision)
    text_config = getattr(config, "text_config", None)
    return VisionQFormer(vision, build_qformer_from_hf_config(config), language_config=text_config.to_dict() if text_config else None)


# ----------------------------------------------------------------------------- loading


def _note_key_bias(state: dict[str, Tensor], report: ConversionReport) -> None:
    for key, tensor in state.items():
        if key.endswith("self_attn.qkv.bias"):
            k_bias = tensor.chunk(3)[1]
            if k_bias.abs().max() > 0:
                report.notes.append(f"{key}: non-zero key bias dropped (it cannot change attention outputs)")


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
                f"{source} is a Hugging Face Blip2 '{kind}' checkpoint without the Q-Former text parts and "
                "ITC/ITM heads; load it into a VisionQFormer (load_hf_parts) or a QFormer"
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
    elif isinstance(model, QFormer):
        if kind != "qformer":
            raise CheckpointError(f"{source} is a full Blip2 '{kind}' checkpoint: load it into a VisionQFormer")
        keymap, allowed = bare_qformer_keymap(model.has_text), ("query_tokens", "word_embeddings.*", "position_embeddings.*")
        report.notes.append("a bare Blip2QFormerModel has no query tokens or text embeddings: ours stay initialised")
    else:
        raise TypeError(f"cannot load a Hugging Face Blip2 checkpoint into {type(model).__name__}")
    mapped = keymap.to_ours(state, report)
    return load_checked(model, mapped, report, allowed_missing=allowed, resample=("vision.vit.pos_embed",), strict=strict)


def _full_blip2(ckpt: HFCheckpoint) -> None:
    if getattr(ckpt.config, "model_type", "") != "blip-2":
        raise CheckpointError(
            f"{ckpt.source} holds a {ckpt.architecture} ({ckpt.config.model_type}), not a full Blip2 model"
        )


def load_hf_retrieval(
    source: str | Path, image_size: int | None = None, frozen_vision: bool = True, strict: bool = True
) -> tuple[Blip2QFormerModel, ConversionReport]:
    """Build and load our stage-1 model from a ``Blip2ForImageTextRetrieval`` directory or hub id.

    Args:
        source: ``save_pretrained`` directory or hub id (``Salesforce/blip2-itm-vit-g``).
        image_size: resolution to run at (position embeddings resampled when it differs).
        frozen_vision: freeze the ViT.
        strict: see :func:`load_hf_state_dict`.
    """
    ckpt = read_hf_checkpoint(source, skip_prefixes=LANGUAGE_PREFIXES)
    _full_blip2(ckpt)
    model = build_from_hf_config(ckpt.config, image_size, frozen_vision)
    report = load_hf_state_dict(model, ckpt.state, ckpt.source, strict)
    report.kind = f"hf:{ckpt.architecture}"
    return model, report


def load_hf_parts(
    source: str | Path,
    image_size: int | None = None,
    frozen_vision: bool = True,
    with_language: bool = True,
    strict: bool = True,
) -> tuple[VisionQFormer, ConversionReport]:
    """Build and load vision + Q-Former from any full Blip2 checkpoint (``Blip2ForConditionalGeneration``,
    ``Blip2Model``, ``Blip2ForImageTextRetrieval``); the language side goes to ``language_state``.

    Args:
        source: ``save_pretrained`` directory or hub id.
        image_size: resolution to run at.
        frozen_vision: freeze the ViT.
        with_language: also read ``language_projection.*``/``language_model.*`` (False skips the LLM's tensors).
        strict: see :func:`load_hf_state_dict`.
    """
    ckpt = read_hf_checkpoint(source, skip_prefixes=() if with_language else LANGUAGE_PREFIXES)
    _full_blip2(ckpt)
    parts = build_parts_from_hf_config(ckpt.config, image_size, frozen_vision)
    report = load_hf_state_dict(parts, ckpt.state, ckpt.source, strict)
    report.kind = f"hf:{ckpt.architecture}"
    return parts, report


def load_hf_qformer(
    source: str | Path, num_query_tokens: int = 32, strict: bool = True
) -> tuple[QFormer, ConversionReport]:
    """Build and load a bare :class:`QFormer` from a Hugging Face ``Blip2QFormerModel`` directory or hub id."""
    ckpt = read_hf_checkpoint(source)
    if getattr(ckpt.config, "model_type", "") != "blip_2_qformer":
        raise CheckpointError(f"{source} holds a {ckpt.architecture} ({ckpt.config.model_type}), not a Blip2QFormerModel")
    model = build_qformer_from_hf_config(ckpt.config, num_query_tokens)
    report = load_hf_state_dict(model, ckpt.state, ckpt.source, strict)
    report.kind = f"hf:{ckpt.architecture}"
    return model, report


def load_hf(
    source: str | Path, image_size: int | None = None, frozen_vision: bool = True, strict: bool = True
) -> tuple[Blip2QFormerModel | VisionQFormer | QFormer, ConversionReport]:
    """Load any supported Hugging Face Blip2 checkpoint into the matching module of ours:
    retrieval -> :class:`Blip2QFormerModel`, generation/``Blip2Model`` -> :class:`VisionQFormer`,
    ``Blip2QFormerModel`` -> :class:`QFormer`."""
    from transformers import AutoConfig

    config_file, _ = _resolve_files(str(source))
    config = AutoConfig.from_pretrained(str(config_file.parent))
    if config.model_type == "blip_2_qformer":
        return load_hf_qformer(source, strict=strict)
    if config.model_type != "blip-2":
        raise CheckpointError(f"{source} holds a {config.model_type} model, not Blip2")
    archs = getattr(config, "architectures", None) or []
    if config.qformer_config.use_qformer_text_input and "Blip2ForConditionalGeneration" not in archs:
        return load_hf_retrieval(source, image_size, frozen_vision, strict)
    return load_hf_parts(source, image_size, frozen_vision, strict=strict)


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
