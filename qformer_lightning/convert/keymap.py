"""Two-way key mapping between another codebase's state dict and ours.

A :class:`KeyRule` ties one or more of our tensor names to one or more checkpoint names, with
the functions that turn one side into the other (a rename, a fused ``[q; k; v]`` projection,
a bias split). Patterns hold ``{i}`` (a layer index) and ``{p}`` (``weight`` or ``bias``).
The same rules drive import (checkpoint -> ours) and export (ours -> checkpoint), so a round
trip is exact by construction and tested once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from qformer_lightning.convert.report import CheckpointError, ConversionReport, matches_any

Converter = Callable[[list[Tensor]], list[Tensor]]


def _identity(tensors: list[Tensor]) -> list[Tensor]:
    return list(tensors)


def _cat(tensors: list[Tensor]) -> list[Tensor]:
    """Fuse projections row-wise: (D, Din) x n -> (n*D, Din); biases (D,) x n -> (n*D,)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CheckpointError(f"cannot fuse projections of different shapes {[tuple(t.shape) for t in tensors]}")
    return [torch.cat(tensors, dim=0)]


def _chunker(parts: int) -> Converter:
    def chunk(tensors: list[Tensor]) -> list[Tensor]:
        return [t.clone() for t in tensors[0].chunk(parts, dim=0)]

    return chunk


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


@dataclass(frozen=True)
class KeyRule:
    """One correspondence between our names and checkpoint names.

    Args:
        ours: our name patterns.
        theirs: checkpoint name patterns.
        to_ours: checkpoint tensors (in ``theirs`` order) -> our tensors (in ``ours`` order).
        to_theirs: the inverse.
    """

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Converter = _identity
    to_theirs: Converter = _identity
    _ours_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _theirs_re: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ours_re", tuple(_compile(p) for p in self.ours))
        object.__setattr__(self, "_theirs_re", tuple(_compile(p) for p in self.theirs))

    @staticmethod
    def _match(patterns: tuple[re.Pattern[str], ...], key: str) -> tuple[int, tuple[tuple[str, str], ...]] | None:
        for slot, regex in enumerate(patterns):
            m = regex.match(key)
            if m:
                return slot, tuple(sorted(m.groupdict().items()))
        return None


def rename(ours: str, theirs: str) -> KeyRule:
    """A plain rename; ``{p}`` in both patterns covers weight and bias."""
    return KeyRule((ours,), (theirs,))


def fused(ours: str, theirs: Iterable[str]) -> KeyRule:
    """Our fused projection (rows in ``theirs`` order) <-> separate checkpoint projections."""
    theirs = tuple(theirs)
    return KeyRule((ours,), theirs, _cat, _chunker(len(theirs)))


def _apply(
    rules: list[KeyRule],
    state: dict[str, Tensor],
    source_side: str,
    what: str,
) -> tuple[dict[str, tuple[str, Tensor]], list[str]]:
    """Group the keys of ``state`` by (rule, bindings), convert complete groups, return unmatched keys."""
    groups: dict[tuple[int, tuple[tuple[str, str], ...]], dict[int, str]] = {}
    unmatched: list[str] = []
    for key in state:
        for index, rule in enumerate(rules):
            patterns = rule._theirs_re if source_side == "theirs" else rule._ours_re
            hit = KeyRule._match(patterns, key)
            if hit is not None:
                slot, bindings = hit
                groups.setdefault((index, bindings), {})[slot] = key
                break
        else:
            unmatched.append(key)
    out: dict[str, tuple[str, Tensor]] = {}
    for (index, bindings), slots in groups.items():
        rule = rules[index]
        sources = rule.theirs if source_side == "theirs" else rule.ours
        targets = rule.ours if source_side == "theirs" else rule.theirs
        values = dict(bindings)
        if len(slots) != len(sources):
            have = [slots[s] for s in sorted(slots)]
            lack = [p.format(**values) for s, p in enumerate(sources) if s not in slots]
            raise CheckpointError(f"{what}: incomplete group, has {have} but not {lack}")
        keys = [slots[s] for s in range(len(sources))]
        convert = rule.to_ours if source_side == "theirs" else rule.to_theirs
        try:
            tensors = convert([state[k] for k in keys])
        except CheckpointError as err:
            raise CheckpointError(f"{what}: {keys}: {err}") from err
        origin = " + ".join(keys)
        for pattern, tensor in zip(targets, tensors):
            out[pattern.format(**values)] = (origin, tensor)
    return out, unmatched


@dataclass
class KeyMap:
    """A set of rules plus the checkpoint keys to skip on purpose.

    Args:
        rules: the correspondences.
        ignore: shell-style patterns of checkpoint keys that carry no weights of ours
            (non-persistent buffers such as ``position_ids``); listed in ``report.ignored``.
    """

    rules: list[KeyRule]
    ignore: tuple[str, ...] = ()

    def to_ours(self, state: dict[str, Tensor], report: ConversionReport) -> dict[str, tuple[str, Tensor]]:
        """Checkpoint state -> our name -> (checkpoint key(s), tensor); unknown keys go to
        ``report.unexpected``, ignored ones to ``report.ignored``."""
        mapped, unmatched = _apply(self.rules, state, "theirs", report.source)
        for key in unmatched:
            (report.ignored if matches_any(key, self.ignore) else report.unexpected).append(key)
        return mapped

    def to_theirs(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Our state -> checkpoint state; returns it and our names no rule covers."""
        mapped, unmatched = _apply(self.rules, state, "ours", "export")
        return {key: tensor for key, (_, tensor) in mapped.items()}, unmatched


def bert_layer_rules(ours_prefix: str, theirs_prefix: str, attn: str, text_ffn: bool = True) -> list[KeyRule]:
    """Rules of one BERT-layout Q-Former layer (LAVIS ``Qformer.bert.encoder.layer.{i}``, Hugging Face
    ``qformer.encoder.layer.{i}``).

    Args:
        ours_prefix: e.g. ``"qformer.layers.{i}"``.
        theirs_prefix: e.g. ``"qformer.encoder.layer.{i}"``.
        attn: the name of the inner attention module: ``"self"`` (BERT, LAVIS) or ``"attention"``
            (Hugging Face Blip2).
        text_ffn: include the text FFN (``intermediate``/``output``).
    """
    o, t = ours_prefix, theirs_prefix
    rules = [
        fused(f"{o}.self_attn.qkv_proj.{{p}}", [f"{t}.attention.{attn}.{n}.{{p}}" for n in ("query", "key", "value")]),
        rename(f"{o}.self_attn.out_proj.{{p}}", f"{t}.attention.output.dense.{{p}}"),
        rename(f"{o}.self_attn.norm.{{p}}", f"{t}.attention.output.LayerNorm.{{p}}"),
        rename(f"{o}.cross_attn.q_proj.{{p}}", f"{t}.crossattention.{attn}.query.{{p}}"),
        fused(f"{o}.cross_attn.kv_proj.{{p}}", [f"{t}.crossattention.{attn}.{n}.{{p}}" for n in ("key", "value")]),
        rename(f"{o}.cross_attn.out_proj.{{p}}", f"{t}.crossattention.output.dense.{{p}}"),
        rename(f"{o}.cross_attn.norm.{{p}}", f"{t}.crossattention.output.LayerNorm.{{p}}"),
        rename(f"{o}.query_ffn.fc1.{{p}}", f"{t}.intermediate_query.dense.{{p}}"),
        rename(f"{o}.query_ffn.fc2.{{p}}", f"{t}.output_query.dense.{{p}}"),
        rename(f"{o}.query_ffn.norm.{{p}}", f"{t}.output_query.LayerNorm.{{p}}"),
    ]
    if text_ffn:
        rules += [
            rename(f"{o}.text_ffn.fc1.{{p}}", f"{t}.intermediate.dense.{{p}}"),
            rename(f"{o}.text_ffn.fc2.{{p}}", f"{t}.output.dense.{{p}}"),
            rename(f"{o}.text_ffn.norm.{{p}}", f"{t}.output.LayerNorm.{{p}}"),
        ]
    return rules


def eva_block_rules(ours_prefix: str, theirs_prefix: str) -> list[KeyRule]:
    """Rules of the EVA ViT in the timm/LAVIS layout (identical names): the whole vision tower.

    Args:
        ours_prefix: ``"vision.vit"``.
        theirs_prefix: ``"visual_encoder"`` (LAVIS).
    """
    o, t = ours_prefix, theirs_prefix
    names = ["cls_token", "pos_embed", "patch_embed.proj.{p}"]
    block = ["norm1.{p}", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.{p}", "norm2.{p}",
             "mlp.fc1.{p}", "mlp.fc2.{p}"]
    rules = [rename(f"{o}.{n}", f"{t}.{n}") for n in names]
    rules += [rename(f"{o}.blocks.{{i}}.{n}", f"{t}.blocks.{{i}}.{n}") for n in block]
    return rules


def rename_prefixes(
    state: dict[str, Tensor], table: dict[str, str], report: ConversionReport
) -> dict[str, tuple[str, Tensor]]:
    """Checkpoint tensors whose key starts with a prefix in ``table`` under our prefix instead
    (``language_model.x`` -> ``llm.model.x``); keys with none of the prefixes go to ``report.unexpected``.

    Returns:
        our name -> (checkpoint key, tensor).
    """
    out: dict[str, tuple[str, Tensor]] = {}
    for key, tensor in state.items():
        theirs = next((prefix for prefix in table if key.startswith(prefix)), None)
        if theirs is None:
            report.unexpected.append(key)
        else:
            out[table[theirs] + key[len(theirs) :]] = (key, tensor)
    return out
