"""Vision-tower weights from a local directory, an fsspec URL or a hub id.

Only the tower's tensors are read and only the shards that hold them are opened: a full 7B VLM
checkpoint costs the vision tower's bytes, not the language model's. safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, not safetensors, or does not match the encoder."""


def _cache_root() -> Path:
    return Path(os.environ.get("TOWERFLOW_CACHE", Path.home() / ".cache" / "towerflow")) / "weights"


@dataclass
class Checkpoint:
    """A checkpoint directory on any fsspec filesystem; remote files are fetched on first use."""

    fs: fsspec.AbstractFileSystem
    root: str
    location: str
    opened: list[str] = field(default_factory=list)

    @property
    def is_local(self) -> bool:
        return "file" in self.fs.protocol or "local" in self.fs.protocol

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_json(self, name: str) -> dict | None:
        if not self.exists(name):
            return None
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())

    def local_file(self, name: str) -> str:
        """A local path for `name`, downloading it into the cache when the checkpoint is remote."""
        self.opened.append(name)
        if self.is_local:
            return self.path(name)
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        dest = _cache_root() / key / name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            self.fs.get(self.path(name), str(tmp))
            tmp.replace(dest)
        return str(dest)

    def listing(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))


def open_checkpoint(weights: str | os.PathLike, storage_options: dict | None = None) -> Checkpoint:
    """Resolve WEIGHTS: a local directory, an fsspec URL (s3://, gs://, file://) or a hub id (org/name)."""
    text = os.fspath(weights)
    if os.path.isdir(text):
        fs = fsspec.filesystem("file")
        return Checkpoint(fs, os.path.abspath(text), text)
    if "://" in text:
        fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
        if not fs.isdir(root):
            raise CheckpointError(f"weights {text!r}: no such checkpoint directory")
        return Checkpoint(fs, root, text)
    if _HUB_ID.match(text) and not os.path.exists(text):
        from huggingface_hub import HfFileSystem

        return Checkpoint(HfFileSystem(), text, text)
    raise CheckpointError(f"weights {text!r}: no such directory (expected a local directory, URL or hub id)")


def _weight_map(ckpt: Checkpoint, allow_pickle: bool = False) -> dict[str, str]:
    index = ckpt.read_json(INDEX_FILE)
    if index is not None:
        return dict(index["weight_map"])
    if ckpt.exists(SINGLE_FILE):
        with safe_open(ckpt.local_file(SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    pickles = [n for n in ckpt.listing() if n.endswith(PICKLE_SUFFIXES)]
    if pickles and allow_pickle:
        index = ckpt.read_json(PICKLE_INDEX)
        if index is not None:
            return dict(index["weight_map"])
        return dict.fromkeys(_load_pickle(ckpt, pickles[0]), pickles[0])
    if pickles:
        raise CheckpointError(
            f"{ckpt.location}: only safetensors checkpoints are loaded by default; found pickle file(s) "
            f"{', '.join(pickles)} (convert them to safetensors, or pass allow_pickle=True to load them "
            "with torch.load(weights_only=True))"
        )
    raise CheckpointError(f"{ckpt.location}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _load_pickle(ckpt: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """Only when allowed, and never unrestricted: weights_only refuses any pickled code."""
    try:
        state = torch.load(ckpt.local_file(name), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unsafe or broken pickle is this checkpoint's error
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(
            f"{ckpt.location}/{name}: refused by torch.load(weights_only=True): {first}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{ckpt.location}/{name}: not a state dict of tensors")
    return state


def _pick_prefix(keys: Iterable[str], prefixes: tuple[str, ...]) -> str:
    """The checkpoint's prefix for the tower ('' for a vision-only checkpoint)."""
    keys = list(keys)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def read_tower_tensors(
    ckpt: Checkpoint, prefixes: tuple[str, ...], allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tower's tensors, prefix stripped, reading only the shards that hold them."""
    weight_map = _weight_map(ckpt, allow_pickle)
    prefix = _pick_prefix(weight_map, prefixes)
    wanted: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if key.startswith(prefix):
            wanted.setdefault(shard, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(wanted.items()):
        if not ckpt.exists(shard):
            raise CheckpointError(f"{ckpt.location}: shard {shard} named by the index is missing")
        if shard.endswith(PICKLE_SUFFIXES):  # reachable only with allow_pickle
            state = _load_pickle(ckpt, shard)
            tensors.update({key[len(prefix) :]: state[key] for key in keys})
            continue
        with safe_open(ckpt.local_file(shard), framework="pt") as f:
            for key in keys:
                tensors[key[len(prefix) :]] = f.get_tensor(key)
    return tensors


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a checkpoint that does not fit the architecture, naming what is wrong.

    Works on transformers' own loading report, so its checkpoint key renamings are honoured.
    """
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    wrong = sorted(
        f"{k[0]}: checkpoint {tuple(k[1])} vs model {tuple(k[2])}"
        if isinstance(k, tuple) and len(k) == 3
        else str(k)
        for k in info.get("mismatched_keys", ())
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {', '.join(wrong[:2])}")
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]))
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the architecture: {'; '.join(problems)}")


def tensors_revision(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of the weights, independent of key names and file layout.

    Checkpoints of one model use different prefixes and (across transformers versions) different
    key names; the same tensors must give the same revision, so only values, dtypes and shapes count.
    """
    digests = []
    for t in tensors.values():
        t = t.contiguous()
        h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()[:16]
