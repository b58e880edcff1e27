"""Clear messages for the mistakes people make when pointing the project at weights and data.

- :func:`explain_hub_errors`: wrap a ``from_pretrained`` / ``timm.create_model(pretrained=True)``
  call; a hub id that cannot be fetched (no network, ``HF_HUB_OFFLINE=1`` and nothing cached)
  becomes a :class:`HubUnreachableError` saying how to pass a local directory (or file) and
  which option to set; a local path that does not exist becomes a ``FileNotFoundError`` naming
  it instead of the hub's "couldn't connect" message.
- :func:`check_checkpoint_task`: a checkpoint written by another task (stage 1 in a stage-2 run):
  the CLI must check it before LightningCLI merges the checkpoint's hyperparameters into the
  config (that merge otherwise fails first, with a jsonargparse message about missing arguments).
- :func:`check_checkpoint_file`: a checkpoint file that cannot be read at all (empty, truncated or
  corrupt, not a torch file), given as ``ckpt_path`` or as a task's ``pretrained``: the message
  names the path, what is wrong, and the newest intact checkpoint in the same directory (torch's
  own message is an mmap or zip error that names neither).
- :func:`check_image_size`: an image size the vision encoder cannot take (not a multiple of the
  patch size, or not the size the encoder is built for), with the option to change.

The other common mistakes already fail clearly where they happen (each message is tested in
``tests/test_errors.py``): a missing data path (the data modules, at setup), a config typo
(jsonargparse names the key), a checkpoint from another stage outside the CLI
(``Blip2Task.on_load_checkpoint``, same message as :func:`check_checkpoint_task`).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONNECTIVITY_HINTS = (
    "couldn't connect",
    "could not connect",
    "offline mode",
    "offline",
    "cannot find the requested files in the local cache",
    "connection",
    "name resolution",
    "timed out",
)
"""Lower-case fragments of the hub libraries' messages when the hub cannot be reached."""


class HubUnreachableError(OSError):
    """Weights named by a hub id could not be fetched (no network, or offline with nothing cached)."""


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` is written as a filesystem path rather than a hub id (``owner/name`` or ``name``).

    Paths: absolute, starting with ``.`` or ``~``, using the OS separator (other than ``/``), with
    more than one ``/``, or ending in a weight-file suffix.
    """
    if source.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in source):
        return True
    if source.count("/") > 1:
        return True
    return source.endswith((".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".gguf", ".json"))


def is_connectivity_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the hub could not be reached."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "ConnectError"):
            return True
        if any(hint in str(current).lower() for hint in CONNECTIVITY_HINTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def hub_unreachable_message(
    source: str, what: str, option: str, err: BaseException, local: str = "directory", download_hint: str | None = None
) -> str:
    """The message of :class:`HubUnreachableError` (see :func:`explain_hub_errors` for the arguments)."""
    hint = download_hint or (
        f"run `hf download {source} --local-dir DIR` (or `from_pretrained({source!r}).save_pretrained(DIR)`), copy DIR here"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    state = "HF_HUB_OFFLINE=1 is set and it is not in the local cache" if offline else "the hub is unreachable from here and it is not in the local cache"
    return (
        f"could not load the {what} {source!r} from the Hugging Face hub: {state} "
        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). "
        f"Pass a local {local} instead: on a machine with network {hint} and set {option} to it."
    )


@contextmanager
def explain_hub_errors(
    source: str | None, what: str, option: str, local: str = "directory", download_hint: str | None = None
) -> Iterator[None]:
    """Re-raise a failed hub load of ``source`` with advice (module docstring).

    Usage::

        with explain_hub_errors(path, "language model", "model.init_args.model.init_args.llm.init_args.name_or_path"):
            config = AutoConfig.from_pretrained(path)

    Args:
        source: what was given to the loader (hub id or path); ``None`` disables the translation.
        what: what is loaded, for the message ("language model", "image encoder weights").
        option: the config option that names the source.
        local: what to pass instead ("directory", "file").
        download_hint: how to get the files where the hub is reachable (default: ``hf download``).

    Raises:
        HubUnreachableError: a hub id that could not be fetched.
        FileNotFoundError: a local path that does not exist.
    """
    try:
        yield
    except (OSError, ValueError) as err:
        if source is None or isinstance(err, HubUnreachableError):
            raise
        path = Path(source).expanduser()
        if path.exists():
            raise  # a local directory with a problem of its own: the loader's message says which
        if looks_like_local_path(source):
            raise FileNotFoundError(f"the {what} path {source!r} does not exist (set {option} to an existing {local})") from err
        if not is_connectivity_error(err):
            raise
        raise HubUnreachableError(hub_unreachable_message(source, what, option, err, local, download_hint)) from err


def task_mismatch_message(checkpoint_task: str, run_task: str) -> str:
    """The message for a checkpoint of task ``checkpoint_task`` given to a run of ``run_task`` (class paths)."""
    return (
        f"checkpoint was written by task {checkpoint_task}, but this run's task is {run_task}: a checkpoint "
        "resumes only its own task. To start from another stage's weights use the task's `pretrained` option "
        "(it reports what is loaded and left)"
    )


CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Suffixes of torch checkpoint files (searched for an intact sibling of a bad one)."""


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read: empty, truncated or corrupt, or not a torch file."""


def checkpoint_file_problem(path: str | Path) -> str | None:
    """What makes the file at ``path`` unreadable as a torch checkpoint, read cheaply (its size, its
    first bytes and its zip central directory); ``None`` when it looks intact.

    torch writes a zip archive holding ``<name>/data.pkl``; a file cut short while being written
    has no central directory (that comes last). A pre-1.6 (non-zip) torch file passes: only
    loading it can tell.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x80"):
        return None  # the legacy pickle format
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK\x03\x04"):
            return f"is truncated or corrupt: a zip archive without its central directory ({size} bytes; cut off while being written?)"
        return f"is not a torch checkpoint: not a zip archive (it starts with {head!r})"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"is truncated or corrupt: its zip central directory cannot be read ({err})"
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return f"is not a torch checkpoint: a zip archive without data.pkl (entries {names[:3]})"
    return None


def is_intact_checkpoint(path: str | Path) -> bool:
    """Whether the file at ``path`` reads as a torch checkpoint: no :func:`checkpoint_file_problem`,
    and ``torch.load`` with ``mmap=True`` (tensors are not read) unpickles its structure. A file that
    a weights-only load refuses for its pickled objects counts as intact."""
    import torch

    try:
        if checkpoint_file_problem(path) is not None:
            return False
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not intact"
        return False
    return True


def newest_intact_sibling(path: str | Path) -> Path | None:
    """The most recently written intact checkpoint file beside ``path`` (not ``path`` itself), if any.

    Candidates are the directory's files with a suffix of :data:`CHECKPOINT_SUFFIXES`, newest
    first (modification time, then name); the first intact one is returned.
    """
    path = Path(path)
    try:
        files = [p for p in path.parent.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()]
    except OSError:
        return None
    files = [p for p in files if p.resolve() != path.resolve()]
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    return next((p for p in files if is_intact_checkpoint(p)), None)


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise when the file at ``path`` cannot be a readable torch checkpoint; a path that is not a
    file passes (the caller reports a missing file, or reads a directory).

    Args:
        path: the file.
        what: what the file is, for the message ("checkpoint", "pretrained checkpoint").

    Raises:
        CheckpointFileError: naming the path, what is wrong (:func:`checkpoint_file_problem`) and
            the newest intact checkpoint in the same directory (:func:`newest_intact_sibling`).
    """
    path = Path(path)
    if not path.is_file():
        return
    problem = checkpoint_file_problem(path)
    if problem is None:
        return
    sibling = newest_intact_sibling(path)
    hint = (
        f"the newest intact checkpoint in the same directory is {str(sibling)!r}: pass that one instead"
        if sibling is not None
        else f"no intact checkpoint is in {str(path.parent)!r}"
    )
    raise CheckpointFileError(f"{what} {str(path)!r} {problem}; {hint}")


def check_checkpoint_task(ckpt_path: str | Path, model_class_path: str) -> None:
    """Raise when the checkpoint at ``ckpt_path`` cannot be read (:func:`check_checkpoint_file`) or
    was written by another task than ``model_class_path``.

    Tasks are compared by class name, as ``Blip2Task.on_load_checkpoint`` does. A checkpoint
    without qformer_lightning's entry, or a path that is not a file, passes (the checkpoint
    loader reports those).

    Raises:
        CheckpointFileError: an empty, truncated or corrupt file, or not a torch file.
        ValueError: the checkpoint's task differs (:func:`task_mismatch_message`).
    """
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        return
    check_checkpoint_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = checkpoint.get("qformer_lightning") if isinstance(checkpoint, dict) else None
    if not meta or "task" not in meta:
        return
    if meta["task"] != model_class_path.rsplit(".", 1)[-1]:
        raise ValueError(task_mismatch_message(meta.get("task_class", meta["task"]), model_class_path))


def check_image_size(image_size: int, patch_size: int, model_name: str, option: str = "image_size") -> None:
    """Raise when ``image_size`` does not split into whole patches.

    Raises:
        ValueError: naming the size, the patch size, the nearest valid sizes and the option.
    """
    if image_size < patch_size or image_size % patch_size:
        lower = max(patch_size, image_size // patch_size * patch_size)
        upper = (image_size // patch_size + 1) * patch_size
        raise ValueError(
            f"image_size {image_size} cannot be taken by {model_name}: it must be a multiple of its patch size "
            f"{patch_size} (e.g. {lower} or {upper}); set {option}"
        )


def check_input_size(height: int, width: int, image_size: int, option: str = "data.init_args.image_size") -> None:
    """Raise when a batch's images are not the size the encoder is built for.

    Raises:
        ValueError: naming both sizes and the data option to set.
    """
    if height != image_size or width != image_size:
        raise ValueError(
            f"images are {height}x{width}, the image encoder is built for {image_size}x{image_size}: "
            f"set {option} to {image_size} (or the encoder's image_size to the data's)"
        )
