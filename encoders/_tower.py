"""One transformers vision tower behind the Encoder contract: loading, saving and tiny checkpoints."""

from __future__ import annotations

import abc
import contextlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from encoders._attention import POST_LOAD_ATTENTION
from encoders._base import Encoder, Prepared, config_hash, resolve_device, resolve_dtype
from encoders._weights import (
    INDEX_FILE,
    CheckpointError,
    check_loading_info,
    open_checkpoint,
    read_tower_tensors,
    tensors_revision,
)
from storage.images import original_size

TOWERFLOW_FILE = "towerflow.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
_PROCESSOR_META_KEYS = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report and a progress bar per load; actors load often."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


class TowerEncoder(Encoder):
    """Subclasses name the transformers classes and the checkpoint conventions of their family."""

    config_class: ClassVar[type]
    model_class: ClassVar[type]
    processor_class: ClassVar[type]
    model_types: ClassVar[tuple[str, ...]]  # accepted config.json model_type values
    vision_prefixes: ClassVar[tuple[str, ...]]  # tower prefixes inside a full checkpoint, most specific first
    vlm_model_type: ClassVar[str]
    vlm_architecture: ClassVar[str]
    vlm_prefix: ClassVar[str]  # the prefix used by the released checkpoints of this family

    def __init__(
        self,
        model: torch.nn.Module | None,
        processor: Any,
        *,
        device: torch.device,
        revision: str,
        config: Any = None,
    ):
        """model=None gives a preprocessing-only instance (CPU decode workers need no weights)."""
        self.model = model.eval() if model is not None else None
        self.config = model.config if model is not None else config
        self.processor = processor
        self.device = device
        self.dtype = next(model.parameters()).dtype if model is not None else torch.float32
        self.revision = revision
        self.preprocess_hash = config_hash(self.processor_config())

    # -- family hooks ------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def tiny_config(cls) -> Any:
        """A few-layer, narrow config of the family (tests, demo)."""

    @classmethod
    @abc.abstractmethod
    def tiny_processor_kwargs(cls) -> dict[str, Any]:
        """Preprocessing for tiny checkpoints (small images keep tests fast)."""

    @classmethod
    @abc.abstractmethod
    def default_processor_kwargs(cls) -> dict[str, Any]:
        """The released model's preprocessing, used when a checkpoint ships no preprocessor_config.json."""

    @classmethod
    def processor_overrides(cls, **overrides: Any) -> dict[str, Any]:
        """User overrides (min_pixels, max_pixels, ...) in the processor's own keyword names."""
        if overrides:
            raise TypeError(f"{cls.name} takes no preprocessing overrides, got {', '.join(overrides)}")
        return {}

    @classmethod
    def default_attn_implementation(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Attention used when the caller names none; None is transformers' own default (sdpa)."""
        return None

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        weights: Any,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        storage_options: dict | None = None,
        attn_implementation: str | None = None,
        allow_pickle: bool = False,
        **preprocess: Any,
    ) -> TowerEncoder:
        ckpt = open_checkpoint(weights, storage_options)
        config = cls._read_config(ckpt)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        attn = attn_implementation or cls.default_attn_implementation(dev, torch_dtype)
        if attn and attn not in POST_LOAD_ATTENTION:
            config._attn_implementation = attn
        tensors = read_tower_tensors(ckpt, cls.vision_prefixes, allow_pickle)
        if not tensors:
            raise CheckpointError(f"{ckpt.location}: no tensors of the {cls.name} vision tower found")
        revision = tensors_revision(tensors)
        with _quiet_transformers():
            model, info = cls.model_class.from_pretrained(
                None,
                config=config,
                state_dict=tensors,
                dtype=torch_dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        del tensors
        check_loading_info(info, ckpt.location)
        if attn in POST_LOAD_ATTENTION:
            model.config._attn_implementation = attn  # the setter reaches every block (shared config)
        return cls(model.to(dev), cls._read_processor(ckpt, preprocess), device=dev, revision=revision)

    @classmethod
    def load_preprocessor(
        cls,
        weights: Any,
        *,
        storage_options: dict | None = None,
        revision: bool = False,
        allow_pickle: bool = False,
        **preprocess: Any,
    ) -> TowerEncoder:
        """Only config and preprocessing: what decode workers need, without reading any tensor.

        revision=True also hashes the tower's tensors (a planner needs the revision, not a model).
        """
        ckpt = open_checkpoint(weights, storage_options)
        config = cls._read_config(ckpt)
        processor = cls._read_processor(ckpt, preprocess)
        rev = (
            tensors_revision(read_tower_tensors(ckpt, cls.vision_prefixes, allow_pickle)) if revision else ""
        )
        return cls(None, processor, device=torch.device("cpu"), revision=rev, config=config)

    @classmethod
    def _read_config(cls, ckpt: Any) -> Any:
        config_dict = ckpt.read_json("config.json")
        if config_dict is None:
            raise CheckpointError(f"{ckpt.location}: no config.json")
        model_type = config_dict.get("model_type")
        if model_type not in cls.model_types:
            raise CheckpointError(
                f"{ckpt.location}: config.json is a {model_type!r} model; "
                f"{cls.name} expects {' or '.join(cls.model_types)}"
            )
        return cls.config_class.from_dict(dict(config_dict.get("vision_config", config_dict)))

    @classmethod
    def _read_processor(cls, ckpt: Any, preprocess: dict[str, Any]) -> Any:
        processor_kwargs = ckpt.read_json(PREPROCESSOR_FILE) or cls.default_processor_kwargs()
        processor_kwargs = {k: v for k, v in processor_kwargs.items() if k not in _PROCESSOR_META_KEYS}
        processor_kwargs.update(cls.processor_overrides(**preprocess))
        return cls.processor_class(**processor_kwargs)

    @property
    def can_embed(self) -> bool:
        return self.model is not None

    def processor_config(self) -> dict[str, Any]:
        return json.loads(self.processor.to_json_string())

    # -- saving ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """A vision-only checkpoint that `encoders.load(name, weights=directory)` reads back."""
        _write_vision_checkpoint(Path(directory), self.name, self.model, self.processor)

    @classmethod
    def write_tiny_checkpoint(
        cls, directory: str | os.PathLike, layout: str = "vision", seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        model = cls.model_class._from_config(cls.tiny_config()).eval()
        processor = cls.processor_class(**cls.tiny_processor_kwargs())
        if layout == "vision":
            _write_vision_checkpoint(Path(directory), cls.name, model, processor)
        elif layout == "vlm":
            cls._write_vlm_checkpoint(Path(directory), model, processor, seed)
        else:
            raise ValueError(f"unknown checkpoint layout {layout!r}; use 'vision' or 'vlm'")

    @classmethod
    def vlm_config_dict(cls, vision_config: Any) -> dict[str, Any]:
        return {
            "model_type": cls.vlm_model_type,
            "architectures": [cls.vlm_architecture],
            "vision_config": vision_config.to_dict(),
            "text_config": {"hidden_size": 64, "vocab_size": 256, "num_hidden_layers": 1},
        }

    @classmethod
    def _write_vlm_checkpoint(
        cls, directory: Path, model: torch.nn.Module, processor: Any, seed: int
    ) -> None:
        """The layout of a released VLM: config with vision_config, a vision shard and a language shard."""
        directory.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed + 1)
        vision = {cls.vlm_prefix + k: v.contiguous() for k, v in model.state_dict().items()}
        language = {
            "model.language_model.embed_tokens.weight": torch.randn(256, 64, generator=gen),
            "model.language_model.norm.weight": torch.ones(64),
            "lm_head.weight": torch.randn(256, 64, generator=gen),
        }
        shards = {"model-00001-of-00002.safetensors": vision, "model-00002-of-00002.safetensors": language}
        weight_map = {}
        for fname, tensors in shards.items():
            save_file(tensors, str(directory / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
        (directory / "config.json").write_text(json.dumps(cls.vlm_config_dict(model.config), indent=2))
        total = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        processor.to_json_file(str(directory / PREPROCESSOR_FILE))


def _write_vision_checkpoint(directory: Path, name: str, model: torch.nn.Module, processor: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(str(directory), safe_serialization=True)
    processor.to_json_file(str(directory / PREPROCESSOR_FILE))
    (directory / TOWERFLOW_FILE).write_text(json.dumps({"encoder": name, "layout": "vision"}) + "\n")


def processor_inputs(processor: Any, image: Any, **overrides: Any) -> dict[str, np.ndarray]:
    """The model's own image processor on one RGB image, as numpy."""
    out = processor(images=[image], return_tensors="np", **overrides)
    return {k: np.asarray(v) for k, v in out.items()}


def prepared_from(
    pixel_values: np.ndarray, image: Any, grid_thw: tuple[int, int, int] | None, seq_len: int
) -> Prepared:
    width, height = original_size(image)
    return Prepared(
        pixel_values=np.ascontiguousarray(
            pixel_values, dtype=np.uint8 if pixel_values.dtype == np.uint8 else np.float32
        ),
        grid_thw=grid_thw,
        width=width,
        height=height,
        seq_len=seq_len,
    )
