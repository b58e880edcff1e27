"""Our own checkpoint file: the state dict plus the constructor arguments that rebuild the model.

Layout of the torch file (loadable with ``weights_only=True``)::

    {"format": "qformer_lightning", "version": 1,
     "kind": "blip2_qformer" | "vision_qformer",
     "vision": TimmVisionEncoder kwargs, "vit_norm_eps": float,
     "qformer": QFormer kwargs,
     "model": Blip2QFormerModel kwargs (kind blip2_qformer),
     "state_dict": {name: tensor},
     "language_state": {name: tensor}, "language_config": dict | None (kind vision_qformer)}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qformer_lightning.convert.modules import build_vision, qformer_init_args, vision_init_args, vit_norm_eps
from qformer_lightning.convert.parts import VisionQFormer
from qformer_lightning.convert.report import CheckpointError, ConversionReport, load_checked
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

FORMAT = "qformer_lightning"
VERSION = 1


def _plain(obj: Any) -> Any:
    """A JSON round trip: only str/int/float/bool/None/list/dict remain (weights-only loadable)."""
    return json.loads(json.dumps(obj, default=str))


def native_payload(model: Blip2QFormerModel | VisionQFormer) -> dict[str, Any]:
    """The dict :func:`save_native` writes."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "vision": _plain(vision_init_args(model.vision)),
        "vit_norm_eps": vit_norm_eps(model.vision),
        "qformer": _plain(qformer_init_args(model.qformer)),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    if isinstance(model, Blip2QFormerModel):
        payload["kind"] = "blip2_qformer"
        payload["model"] = dict(
            embed_dim=model.vision_proj.out_features,
            vocab_size=model.lm_head.decoder.out_features,
            tie_lm_head=model.lm_head_tied,
            min_temperature=model.min_temperature,
            max_temperature=model.max_temperature,
        )
    elif isinstance(model, VisionQFormer):
        payload["kind"] = "vision_qformer"
        payload["language_state"] = {k: v.detach().clone() for k, v in model.language_state.items()}
        payload["language_config"] = _plain(model.language_config)
    else:
        raise TypeError(f"cannot save {type(model).__name__} in the qformer_lightning format")
    return payload


def save_native(model: Blip2QFormerModel | VisionQFormer, path: str | Path) -> Path:
    """Write ``model`` to ``path`` in our format (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(native_payload(model), path)
    return path


def is_native(obj: Any) -> bool:
    """Whether a loaded object is one of our checkpoint payloads."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_native(
    source: str | Path | dict[str, Any],
    image_size: int | None = None,
    frozen_vision: bool | None = None,
    name: str | None = None,
) -> tuple[Blip2QFormerModel | VisionQFormer, ConversionReport]:
    """Rebuild and load a model saved by :func:`save_native`.

    Args:
        source: the file, or its already loaded payload.
        image_size: run at another resolution (position embeddings resampled); default the saved one.
        frozen_vision: override the saved frozen flag of the ViT.
        name: the source named in the report (default the path).
    """
    name = name or (str(source) if not isinstance(source, dict) else "<payload>")
    payload = torch.load(source, map_location="cpu", weights_only=True) if not isinstance(source, dict) else source
    if not is_native(payload):
        raise CheckpointError(f"{name} is not a {FORMAT} checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{name}: format version {payload.get('version')} is not {VERSION}")
    vision_args = dict(payload["vision"])
    if image_size is not None:
        vision_args["image_size"] = image_size
    if frozen_vision is not None:
        vision_args["frozen"] = frozen_vision
    vision = build_vision(vision_args, norm_eps=payload["vit_norm_eps"])
    qformer = QFormer(**payload["qformer"])
    model: Blip2QFormerModel | VisionQFormer
    if payload["kind"] == "blip2_qformer":
        model = Blip2QFormerModel(vision, qformer, **payload["model"])
    elif payload["kind"] == "vision_qformer":
        model = VisionQFormer(vision, qformer, payload.get("language_state"), payload.get("language_config"))
    else:
        raise CheckpointError(f"{name}: unknown kind {payload['kind']!r}")
    report = ConversionReport(source=name, kind=f"{FORMAT}:{payload['kind']}")
    mapped = {k: (k, v) for k, v in payload["state_dict"].items()}
    return model, load_checked(model, mapped, report, resample=("vision.vit.pos_embed",))
