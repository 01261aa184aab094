"""Training checkpoints: one directory per step, made visible by an atomic `latest` pointer.

    out_dir/
      latest                 "step-000400": the newest complete checkpoint (replaced atomically)
      step-000400/
        config.json, model.safetensors    the model, as save_pretrained writes it (fla's layout)
        tokenizer.json                    so that the directory alone is enough for generate.py
        train_state.pt                    optimizer, scheduler, RNG states, step, data position

A checkpoint is written into a hidden `.tmp-step-000400/`, every file fsync'ed, renamed into
place, and only then does `latest` move to it; the previous checkpoint is deleted after that. A
process killed at any moment therefore leaves `latest` naming a complete checkpoint (or no
`latest` at all before the first one). Leftover `.tmp-*` directories are removed by the next save.

train_state.pt is a torch.save of plain containers and tensors, read back with
`torch.load(weights_only=True)`, which cannot run code from the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from hgrn2mini.checkpoint import atomic_write, atomic_write_bytes

LATEST = "latest"
STATE = "train_state.pt"
TOKENIZER = "tokenizer.json"


def save(out_dir: str | os.PathLike, step: int, model, tokenizer_json: str, state: dict[str, Any]) -> Path:
    """Writes checkpoint `step` (model: an unwrapped HGRN2ForCausalLM) and points `latest` at it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = out / name
    if latest(out) == final:  # saved already: the step number says the state is the same
        return final
    for stale in out.glob(".tmp-step-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".tmp-{name}"
    tmp.mkdir()
    model.save_pretrained(tmp)
    atomic_write_bytes(tmp / TOKENIZER, tokenizer_json.encode())
    # Every file above is written atomically: fsync'ed, and its directory fsync'ed after the rename,
    # so the folder is on disk before `latest` moves; writing `latest` fsyncs `out`, which also
    # makes the rename of tmp to final below durable.
    atomic_write(tmp / STATE, lambda path: torch.save(state, path))
    if final.exists():  # renamed by a process killed before it could move `latest`
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_bytes(out / LATEST, (name + "\n").encode())
    for old in out.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory, or None when there is none yet."""
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    directory = Path(out_dir) / pointer.read_text().strip()
    if not (directory / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {directory}, which has no {STATE}: the checkpoint was removed")
    return directory


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)
