"""Checkpoints in fla's (and Hugging Face's) layout: config.json + model.safetensors, or a sharded
model.safetensors.index.json + shards.

Writes are atomic (temporary file in the same directory, fsync, os.replace), so a crash or a full
disk mid-write leaves the previous file intact. Loading reads safetensors only, never a pickle:
a pickle file can run code on load.

Nothing here knows HGRN2: the model passes its config dict and itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# When embeddings are tied, fla / transformers store only the embedding; the head is the same tensor.
TIED_HEAD = "lm_head.weight"
TIED_TO = "model.embeddings.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Calls writer(tmp_path) to write the whole file, then moves it onto path in one step.

    If writer raises (or the process dies), path keeps its old content and the temporary file is
    removed. Usable for any file format, e.g. `atomic_write(p, lambda t: torch.save(obj, t))`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors.torch.save_file, atomically. Tensors are moved to CPU and made contiguous."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, config: dict[str, Any], directory: str | os.PathLike) -> None:
    """Writes model.safetensors (stored dtypes kept) and then config.json into directory."""
    directory = Path(directory)
    tensors = dict(model.state_dict())
    if config.get("tie_word_embeddings") and TIED_HEAD in tensors:
        if tensors[TIED_HEAD].data_ptr() != tensors[TIED_TO].data_ptr():
            raise ValueError(
                f"config says tie_word_embeddings=True but {TIED_HEAD} is not {TIED_TO} in the model"
            )
        del tensors[TIED_HEAD]
    # "format": "pt" is what transformers checks before loading a safetensors file.
    atomic_save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def load_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e


def load_tensors(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in directory, single file or sharded, in its stored dtype."""
    directory = Path(directory)
    device = str(torch.device(device))
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return _read_safetensors(single, device)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} must be JSON with a 'weight_map' object: {e}") from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard name must not reach outside the directory
                raise CheckpointError(f"{index} names shard {shard!r}, expected a file name in {directory}")
            part = _read_safetensors(directory / shard, device)
            listed = {name for name, s in weight_map.items() if s == shard}
            if listed - part.keys():
                lacking = sorted(listed - part.keys())
                raise CheckpointError(f"{directory / shard} lacks tensors {index.name} maps to it: {lacking}")
            tensors.update({name: part[name] for name in listed})
        return tensors
    found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f"; found {found}, which are pickles: convert them to safetensors first" if found else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}{hint}")


def load_pretrained(
    model: nn.Module, directory: str | os.PathLike, device: str | torch.device | None = None
) -> None:
    """Loads the checkpoint in directory into model, taking the stored tensors as the parameters.

    Every problem is reported at once: missing, unexpected and misshapen tensors in one message.
    Tied embeddings: a checkpoint may or may not carry lm_head.weight; the model keeps one tensor.
    """
    directory = Path(directory)
    tensors = load_tensors(directory, device or "cpu")
    expected = dict(model.state_dict(keep_vars=True))
    tied = TIED_HEAD in expected and expected[TIED_HEAD] is expected.get(TIED_TO)
    if tied:
        del expected[TIED_HEAD]
        tensors.pop(TIED_HEAD, None)  # fla writes it in some versions; the embedding is the truth
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshapen = [
        f"{name}: expected {list(p.shape)}, got {list(tensors[name].shape)}"
        for name, p in expected.items()
        if name in tensors and tensors[name].shape != p.shape
    ]
    not_float = [
        f"{name}: expected a floating-point dtype, got {tensors[name].dtype}"
        for name, p in expected.items()
        if name in tensors and p.is_floating_point() and not tensors[name].is_floating_point()
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                         ("wrong dtype", not_float)):
        if items:
            problems.append(f"{title} ({len(items)}): " + ", ".join(items))
    if problems:
        raise CheckpointError(f"checkpoint in {directory} does not fit the model: " + "; ".join(problems))
    for name, old in expected.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(tensors[name], requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, tensors[name])
    if tied:
        module_name, _, attr = TIED_HEAD.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(TIED_TO))
