"""Reading a Hugging Face ``save_pretrained`` directory or hub id: its config and its tensors.

Used for Blip2 checkpoints (:mod:`.hf`) and BERT (:mod:`.bert`); it knows file names
(``config.json``, safetensors or ``pytorch_model.bin``, sharded with an ``*.index.json``), not
key names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qformer_lightning.errors import looks_like_local_path

__all__ = ["WEIGHT_FILES", "HFCheckpoint", "is_hub_id", "read_hf_checkpoint", "read_weights", "resolve_files"]

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
"""Weight files looked for, in this order (the first one present is read)."""


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into memory.

    Attributes:
        source: the directory or hub id.
        config: the ``AutoConfig`` of the checkpoint (``Blip2Config``, ``Blip2QFormerConfig``, ``BertConfig``, ...).
        state: tensor name -> tensor (CPU).
        architecture: ``config.architectures[0]`` if recorded, else the model type.
    """

    source: str
    config: Any
    state: dict[str, Tensor]
    architecture: str


def is_hub_id(source: str | Path) -> bool:
    """Whether ``source`` reads as a hub id (``owner/name``, nothing on disk by that name)."""
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not looks_like_local_path(text)


def _offline_error(source: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load {source!r} from the Hugging Face hub ({type(err).__name__}: {err}). Without network "
        "access (or with HF_HUB_OFFLINE=1 and nothing cached), download it where the hub is reachable "
        "(`model.save_pretrained(dir)` or `hf download REPO --local-dir dir`) and pass the local directory."
    )


def _expand_index(path: Path, fetch: Callable[[str], Path]) -> list[Path]:
    """A weight file, or the shards an ``*.index.json`` names."""
    if not path.name.endswith(".index.json"):
        return [path]
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    return [fetch(shard) for shard in shards]


def _resolve_local(path: Path) -> tuple[Path, list[Path]]:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained directory")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return config, _expand_index(path / name, lambda shard: path / shard)
    raise FileNotFoundError(f"{path} holds none of {list(WEIGHT_FILES)}")


def _resolve_hub(source: str) -> tuple[Path, list[Path]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = Path(hf_hub_download(source, "config.json"))
    except Exception as err:  # offline, unknown repo, no network: all need the same advice
        raise _offline_error(source, err) from err
    for name in WEIGHT_FILES:
        try:
            first = Path(hf_hub_download(source, name))
        except LocalEntryNotFoundError as err:
            raise _offline_error(source, err) from err
        except (EntryNotFoundError, OSError):
            continue
        return config, _expand_index(first, lambda shard: Path(hf_hub_download(source, shard)))
    raise FileNotFoundError(f"hub repo {source} holds none of {list(WEIGHT_FILES)}")


def resolve_files(source: str | Path) -> tuple[Path, list[Path]]:
    """The config file and the weight files of a local directory or a hub id (downloaded if needed).

    Raises:
        FileNotFoundError: no such directory, no config.json or weights, or the hub is unreachable
            (the message says to pass a local directory).
    """
    path = Path(source)
    if path.is_dir():
        return _resolve_local(path)
    if not is_hub_id(source):
        raise FileNotFoundError(f"{str(source)!r} is neither a directory nor a hub id (owner/name)")
    return _resolve_hub(str(source))


def read_weights(files: Iterable[Path], skip_prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors of safetensors / ``pytorch_model.bin`` files, keys starting with ``skip_prefixes``
    left unread."""
    state: dict[str, Tensor] = {}
    files = list(files)

    def wanted(key: str) -> bool:
        return not (skip_prefixes and key.startswith(skip_prefixes))

    for file in tqdm(files, desc="reading weights", unit="file", disable=None if len(files) > 1 else True):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                state.update({key: handle.get_tensor(key) for key in handle.keys() if wanted(key)})
        else:
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in part.items() if wanted(k)})
    return state


def read_hf_checkpoint(source: str | Path, skip_prefixes: tuple[str, ...] = ()) -> HFCheckpoint:
    """Read the config and tensors of a ``save_pretrained`` directory or hub id.

    Args:
        source: a local directory (config.json + model.safetensors, sharded safetensors with their
            index, or pytorch_model.bin) or a hub id such as ``Salesforce/blip2-itm-vit-g``.
        skip_prefixes: key prefixes not to read (e.g. the LLM of a generative Blip2 checkpoint).

    Raises:
        FileNotFoundError: see :func:`resolve_files`.
    """
    from transformers import AutoConfig

    config_file, weight_files = resolve_files(source)
    config = AutoConfig.from_pretrained(str(config_file.parent))
    state = read_weights(weight_files, tuple(skip_prefixes))
    archs = getattr(config, "architectures", None) or [config.model_type]
    return HFCheckpoint(source=str(source), config=config, state=state, architecture=archs[0])
