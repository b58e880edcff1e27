"""Initialise a Q-Former (and its LM head) from a BERT checkpoint, as BLIP-2 does from bert-base-uncased.

Glossary: D width, V vocabulary (ours), Vb BERT's vocabulary, P positions.

What is copied (BERT ``transformers`` names, with or without the ``bert.`` prefix of
``BertLMHeadModel``/``BertForMaskedLM``):

- ``embeddings.{word_embeddings, position_embeddings, LayerNorm}`` -> ``word_embeddings``,
  ``position_embeddings``, ``embed_norm``. Our vocabulary may be larger (bert-base-uncased + ``[DEC]``
  = 30523): the extra rows are initialised as Hugging Face's ``resize_token_embeddings`` does
  (``new_token_init="mean"``: the mean of BERT's rows; ``"normal"``: N(0, initializer_range), what
  LAVIS got from the transformers of its time). BERT adds ``token_type_embeddings[0]`` to every
  single-segment token; our Q-Former has no token types, so by default that row is folded into the
  position embeddings (``fold_token_type=True``), which keeps the text pass equal to BERT's.
  LAVIS drops the row instead (``fold_token_type=False``).
- per layer: ``attention.self.{query,key,value}`` -> fused ``self_attn.qkv_proj``,
  ``attention.output`` -> ``self_attn.{out_proj,norm}``, ``intermediate``/``output`` -> ``text_ffn``
  and also -> ``query_ffn`` (BLIP-2 initialises the query FFN as a copy of BERT's FFN).
  Cross-attention and the query tokens stay randomly initialised (listed as missing).
  A Q-Former with fewer layers than BERT takes BERT's first layers; more layers is an error.
- ``cls.predictions.{transform.dense, transform.LayerNorm, bias, decoder.weight}`` -> ``lm_head``
  when present (bias rows for new tokens 0, decoder rows like the embeddings'); a tied head
  shares the (copied) word embeddings. Without ``cls.*`` (a plain ``BertModel``) the head keeps
  its initialisation (tied heads still share the copied embeddings).

``pooler.*``, ``cls.seq_relationship.*`` and ``position_ids`` are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from qformer_lightning.convert.hf_files import read_hf_checkpoint
from qformer_lightning.convert.report import CheckpointError, ConversionReport, load_checked
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.heads import LMHead
from qformer_lightning.nn.qformer import QFormer

DEFAULT_BERT = "bert-base-uncased"

_IGNORED = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")


def read_bert_checkpoint(source: str | Path = DEFAULT_BERT) -> tuple[Any, dict[str, Tensor]]:
    """Config and state dict of a BERT directory or hub id (``bert.`` prefixes removed).

    Raises:
        FileNotFoundError: no such directory, or the hub is unreachable (the message says to pass
            a local directory).
    """
    checkpoint = read_hf_checkpoint(source)
    if checkpoint.config.model_type != "bert":
        raise CheckpointError(f"{source} holds a {checkpoint.config.model_type} model, not BERT")
    return checkpoint.config, {k.removeprefix("bert."): v for k, v in checkpoint.state.items()}


def _resize_rows(rows: Tensor, size: int, new_rows: Tensor) -> Tensor:
    """(Vb, ...) -> (size, ...) with ``new_rows`` (size - Vb, ...) appended."""
    return torch.cat([rows, new_rows.to(rows.dtype)], dim=0) if size > rows.shape[0] else rows


def _new_token_rows(
    embeddings: Tensor, count: int, how: Literal["mean", "normal"], std: float, generator: torch.Generator | None
) -> Tensor:
    """(count, D) rows for tokens BERT does not have."""
    if how == "mean":
        return embeddings.float().mean(dim=0, keepdim=True).expand(count, -1).clone()
    if how == "normal":
        return torch.randn(count, embeddings.shape[1], generator=generator) * std
    raise ValueError(f"new_token_init must be 'mean' or 'normal', got {how!r}")


def init_qformer_from_bert(
    qformer: QFormer,
    source: str | Path | tuple[Any, dict[str, Tensor]] = DEFAULT_BERT,
    lm_head: LMHead | None = None,
    fold_token_type: bool = True,
    new_token_init: Literal["mean", "normal"] = "mean",
    generator: torch.Generator | None = None,
) -> ConversionReport:
    """Copy BERT weights into ``qformer`` (and ``lm_head``), BLIP-2's initialisation.

    Args:
        qformer: the Q-Former to initialise (text FFNs optional: without them BERT's FFN goes to
            the query FFN only).
        source: a BERT directory, a hub id, or an already read ``(config, state)`` pair.
        lm_head: the LM head to initialise from ``cls.predictions`` (None: skip).
        fold_token_type: add BERT's ``token_type_embeddings[0]`` to the position embeddings.
        new_token_init: rows for tokens beyond BERT's vocabulary: ``"mean"`` or ``"normal"``.
        generator: random source for ``"normal"``.

    Returns:
        The report; ``missing`` lists what stayed random (query tokens, cross-attention).

    Raises:
        CheckpointError: more layers, another width or head count, a smaller vocabulary or more
            positions than BERT has, or an activation other than exact GELU.
    """
    config, state = read_bert_checkpoint(source) if not isinstance(source, tuple) else source
    name = str(source if not isinstance(source, tuple) else getattr(config, "_name_or_path", "BERT"))
    report = ConversionReport(source=name, kind="bert")
    _check_shape(qformer, config, name)
    mapped: dict[str, tuple[str, Tensor]] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{name}: BERT checkpoint lacks {key}")
        used.add(key)
        return state[key]

    # embeddings
    if qformer.word_embeddings is not None and qformer.position_embeddings is not None:
        words = take("embeddings.word_embeddings.weight")  # (Vb, D)
        vocab = qformer.word_embeddings.num_embeddings
        if vocab < words.shape[0]:
            raise CheckpointError(f"{name}: our vocabulary {vocab} is smaller than BERT's {words.shape[0]}")
        new_rows = _new_token_rows(words, vocab - words.shape[0], new_token_init, qformer.initializer_range, generator)
        mapped["qformer.word_embeddings.weight"] = ("embeddings.word_embeddings.weight", _resize_rows(words, vocab, new_rows))
        if vocab > words.shape[0]:
            report.notes.append(f"word embeddings resized {words.shape[0]} -> {vocab}, new rows: {new_token_init}")
        positions = take("embeddings.position_embeddings.weight")  # (Pb, D)
        count = qformer.position_embeddings.num_embeddings
        if count > positions.shape[0]:
            raise CheckpointError(f"{name}: our {count} positions exceed BERT's {positions.shape[0]}")
        positions = positions[:count]
        origin = "embeddings.position_embeddings.weight"
        if fold_token_type and "embeddings.token_type_embeddings.weight" in state:
            positions = positions + take("embeddings.token_type_embeddings.weight")[0]
            origin += " + embeddings.token_type_embeddings.weight[0]"
            report.notes.append("token_type_embeddings[0] folded into the position embeddings")
        mapped["qformer.position_embeddings.weight"] = (origin, positions)
    for p in ("weight", "bias"):
        mapped[f"qformer.embed_norm.{p}"] = (f"embeddings.LayerNorm.{p}", take(f"embeddings.LayerNorm.{p}"))
    # layers
    for i in range(len(qformer.layers)):
        b, o = f"encoder.layer.{i}", f"qformer.layers.{i}"
        for p in ("weight", "bias"):
            qkv = [take(f"{b}.attention.self.{n}.{p}") for n in ("query", "key", "value")]
            mapped[f"{o}.self_attn.qkv_proj.{p}"] = (f"{b}.attention.self.{{query,key,value}}.{p}", torch.cat(qkv))
            mapped[f"{o}.self_attn.out_proj.{p}"] = (f"{b}.attention.output.dense.{p}", take(f"{b}.attention.output.dense.{p}"))
            mapped[f"{o}.self_attn.norm.{p}"] = (f"{b}.attention.output.LayerNorm.{p}", take(f"{b}.attention.output.LayerNorm.{p}"))
            ffn = {
                "fc1": (f"{b}.intermediate.dense.{p}", take(f"{b}.intermediate.dense.{p}")),
                "fc2": (f"{b}.output.dense.{p}", take(f"{b}.output.dense.{p}")),
                "norm": (f"{b}.output.LayerNorm.{p}", take(f"{b}.output.LayerNorm.{p}")),
            }
            for part, (key, tensor) in ffn.items():
                if qformer.has_text:
                    mapped[f"{o}.text_ffn.{part}.{p}"] = (key, tensor)
                mapped[f"{o}.query_ffn.{part}.{p}"] = (key, tensor.clone())
    if config.num_hidden_layers > len(qformer.layers):
        report.notes.append(f"BERT has {config.num_hidden_layers} layers: took the first {len(qformer.layers)}")
    report.notes.append("query FFNs initialised as copies of BERT's FFNs; cross-attention and query tokens left random")
    # LM head
    prefix = "qformer."
    target: Any = qformer
    if lm_head is not None:
        tied = qformer.word_embeddings is not None and lm_head.decoder.weight is qformer.word_embeddings.weight
        if "cls.predictions.transform.dense.weight" in state:
            _map_lm_head(mapped, state, take, lm_head, tied, new_rows if qformer.has_text else None, report)
        else:
            report.notes.append("no cls.predictions in the checkpoint: the LM head keeps its initialisation"
                                + (" (decoder tied to the copied embeddings)" if tied else ""))
        target = _Pair(qformer, lm_head)
    else:
        mapped = {k.removeprefix(prefix): v for k, v in mapped.items()}
    report.unexpected.extend(k for k in state if k not in used and not k.startswith(_IGNORED) and k != "embeddings.token_type_embeddings.weight")
    report.ignored.extend(k for k in state if k not in used and (k.startswith(_IGNORED) or k == "embeddings.token_type_embeddings.weight"))
    if config.num_hidden_layers > len(qformer.layers):
        deeper = [k for k in report.unexpected if k.startswith("encoder.layer.")]
        report.unexpected = [k for k in report.unexpected if k not in deeper]
        report.ignored.extend(deeper)
    return load_checked(target, mapped, report, strict=False)


class _Pair(torch.nn.Module):
    """Q-Former + LM head under the names of :class:`Blip2QFormerModel` (``qformer.*``, ``lm_head.*``)."""

    def __init__(self, qformer: QFormer, lm_head: LMHead) -> None:
        super().__init__()
        self.qformer = qformer
        self.lm_head = lm_head


def _map_lm_head(
    mapped: dict[str, tuple[str, Tensor]],
    state: dict[str, Tensor],
    take: Any,
    lm_head: LMHead,
    tied: bool,
    new_rows: Tensor | None,
    report: ConversionReport,
) -> None:
    c = "cls.predictions"
    vocab = lm_head.decoder.out_features
    for p in ("weight", "bias"):
        mapped[f"lm_head.dense.{p}"] = (f"{c}.transform.dense.{p}", take(f"{c}.transform.dense.{p}"))
        mapped[f"lm_head.norm.{p}"] = (f"{c}.transform.LayerNorm.{p}", take(f"{c}.transform.LayerNorm.{p}"))
    bias = take(f"{c}.bias")  # (Vb,)
    if vocab < bias.shape[0]:
        raise CheckpointError(f"our LM vocabulary {vocab} is smaller than BERT's {bias.shape[0]}")
    mapped["lm_head.decoder.bias"] = (f"{c}.bias", _resize_rows(bias, vocab, bias.new_zeros(vocab - bias.shape[0])))
    if f"{c}.decoder.bias" in state:
        take(f"{c}.decoder.bias")
    if tied:
        decoder = state.get(f"{c}.decoder.weight")
        if decoder is not None:
            take(f"{c}.decoder.weight")
            if not torch.equal(decoder, state["embeddings.word_embeddings.weight"]):
                report.notes.append("BERT's decoder differs from its word embeddings; our tied head uses the embeddings")
    elif f"{c}.decoder.weight" in state:
        decoder = take(f"{c}.decoder.weight")  # (Vb, D)
        extra = new_rows if new_rows is not None else decoder.float().mean(0, keepdim=True).expand(vocab - decoder.shape[0], -1)
        mapped["lm_head.decoder.weight"] = (f"{c}.decoder.weight", _resize_rows(decoder, vocab, extra))
    elif "qformer.word_embeddings.weight" in mapped:  # BERT ties its decoder to the embeddings and saves only those
        origin, words = mapped["qformer.word_embeddings.weight"]
        mapped["lm_head.decoder.weight"] = (origin, words.clone())
        report.notes.append("no cls.predictions.decoder.weight (tied in BERT): the untied decoder starts as the word embeddings")
    report.notes.append("LM head from cls.predictions" + (" (decoder tied to the word embeddings)" if tied else ""))


def _check_shape(qformer: QFormer, config: Any, name: str) -> None:
    layer = qformer.layers[0]
    problems = []
    if config.hidden_size != qformer.hidden_size:
        problems.append(f"hidden_size {config.hidden_size} vs ours {qformer.hidden_size}")
    if config.num_attention_heads != layer.self_attn.num_heads:
        problems.append(f"num_attention_heads {config.num_attention_heads} vs ours {layer.self_attn.num_heads}")
    if config.intermediate_size != layer.query_ffn.fc1.out_features:
        problems.append(f"intermediate_size {config.intermediate_size} vs ours {layer.query_ffn.fc1.out_features}")
    if config.num_hidden_layers < len(qformer.layers):
        problems.append(f"{config.num_hidden_layers} layers vs ours {len(qformer.layers)} (extra layers have no BERT weights)")
    if config.hidden_act != "gelu":
        problems.append(f"hidden_act {config.hidden_act!r} (ours is exact GELU)")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {config.position_embedding_type!r}")
    if problems:
        raise CheckpointError(f"{name} does not fit the Q-Former: " + "; ".join(problems))


def init_model_from_bert(
    model: Blip2QFormerModel,
    source: str | Path | tuple[Any, dict[str, Tensor]] = DEFAULT_BERT,
    fold_token_type: bool = True,
    new_token_init: Literal["mean", "normal"] = "mean",
    generator: torch.Generator | None = None,
) -> ConversionReport:
    """:func:`init_qformer_from_bert` for the stage-1 model's Q-Former and LM head."""
    return init_qformer_from_bert(model.qformer, source, model.lm_head, fold_token_type, new_token_init, generator)
