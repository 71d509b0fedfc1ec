"""The encoder contract shared by every family: preprocess -> pack by token budget -> forward -> pool."""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from storage.images import DecodeConfig, load_image

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
POOLINGS = ("mean", "max", "cls", "none")
OUTPUTS = ("numpy", "torch", "list")
PATCH_LEVELS = ("merged", "pre_merger")
DEFAULT_BATCH_TOKENS = 16384  # accelerators: large packed forwards keep the device busy
# CPU: a forward's activations then stay in cache; at 16384 tokens a forward ran 20-25% slower per image
# (dinov2-small 7.98-9.53 vs 10.50-10.67 images/s at 8 images; small Qwen 2.78-2.99 vs 3.51-3.61; 2-core EPYC)
CPU_BATCH_TOKENS = 2048


def default_batch_tokens(device: torch.device, given: int | None = None) -> int:
    """The token budget of one packed forward: GIVEN, or the device's default when the caller sets none."""
    if given is not None:
        return given
    return CPU_BATCH_TOKENS if device.type == "cpu" else DEFAULT_BATCH_TOKENS


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless the caller says otherwise."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """One image after the model's own preprocessing; plain numpy so Ray can ship it between workers."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int] | None
    width: int
    height: int
    seq_len: int
    parts: dict[str, Prepared] = field(default_factory=dict)


@dataclass
class TowerOutput:
    """One image's forward result: tokens in row-major grid order, float32, on the CPU."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    cls: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    pooled: torch.Tensor | None = None  # set by encoders whose vector is not a pooling of `tokens` (dual)
    fusion: torch.Tensor | None = None


@dataclass(frozen=True)
class EmbedOptions:
    pooling: str
    patches: bool = True
    patch_level: str = "merged"
    deepstack: bool = False
    output: str = "numpy"
    patch_dtype: torch.dtype = torch.float32


@dataclass
class EmbedResult:
    """`pooled` (N, D) or None for pooling='none'; per image `patches` (tokens, D) with `grids` (h, w)."""

    pooled: Any
    patches: list[Any]
    grids: list[tuple[int, int]]
    sizes: list[tuple[int, int]]
    extras: dict[str, list[Any]] = field(default_factory=dict)
    fusion_weights: Any = None

    def __len__(self) -> int:
        return len(self.grids)


def convert(t: torch.Tensor | None, output: str) -> Any:
    if t is None:
        return None
    if output == "torch":
        return t
    if output == "list":
        return t.tolist()
    return t.numpy()


def pool(out: TowerOutput, pooling: str) -> torch.Tensor | None:
    if out.pooled is not None and pooling != "none":
        return out.pooled
    if pooling == "mean":
        return out.tokens.mean(0)
    if pooling == "max":
        return out.tokens.amax(0)
    if pooling == "cls":
        return out.cls
    return None


def plan_batches(costs: Sequence[int], budget: int, keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Group indices so each batch's token cost stays within budget (an oversize image goes alone).

    Items with different keys (e.g. tensor shapes that cannot be stacked) never share a batch.
    """
    if budget <= 0:
        raise ValueError(f"batch token budget must be positive, got {budget}")
    keys = keys if keys is not None else [None] * len(costs)
    open_batches: dict[Any, tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for i, (cost, key) in enumerate(zip(costs, keys, strict=True)):
        idx, used = open_batches.get(key, ([], 0))
        if idx and used + cost > budget:
            done.append(idx)
            idx, used = [], 0
        open_batches[key] = (idx + [i], used + cost)
    done.extend(idx for idx, _ in open_batches.values() if idx)
    return done


class Encoder(abc.ABC):
    """Base class: families implement preprocess_image, forward, num_tokens, dim, load and save."""

    name: ClassVar[str] = ""
    default_pooling: ClassVar[str] = "mean"
    has_cls: ClassVar[bool] = False
    has_merger: ClassVar[bool] = True
    has_deepstack: ClassVar[bool] = False

    device: torch.device
    dtype: torch.dtype
    revision: str
    preprocess_hash: str

    # -- subclass hooks ----------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls, weights: Any, **kwargs: Any) -> Encoder:
        """Build the encoder from WEIGHTS (directory, URL or hub id) on a device and dtype."""

    @classmethod
    @abc.abstractmethod
    def load_preprocessor(cls, weights: Any, **kwargs: Any) -> Encoder:
        """An instance that can only preprocess (and count tokens): no tensors are read."""

    @classmethod
    @abc.abstractmethod
    def write_tiny_checkpoint(cls, directory: str, layout: str = "vision", seed: int = 0) -> None:
        """A random-weight checkpoint of the real architecture, loaded through the real path."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """A vision-only checkpoint that `load` reads back."""

    @abc.abstractmethod
    def preprocess_image(self, image: Any) -> Prepared:
        """The model's own preprocessing of one RGB image."""

    @abc.abstractmethod
    def forward(self, batch: list[Prepared], opts: EmbedOptions) -> list[TowerOutput]:
        """One packed forward; per image, tokens in row-major grid order."""

    @abc.abstractmethod
    def collate(self, batch: list[Prepared]) -> Any:
        """Model inputs for BATCH on the device; with `run_collated`, the bare forward benchmarks time."""

    @abc.abstractmethod
    def run_collated(self, inputs: Any) -> Any:
        """The bare forward on collated inputs."""

    @abc.abstractmethod
    def num_tokens(self, height: int, width: int, *, merged: bool = True) -> int:
        """Tokens an image of this size yields, without running the model."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Width of the pooled vector."""

    @property
    def can_embed(self) -> bool:
        return True

    @property
    def patch_dim(self) -> int:
        """Width of the (merged) patch tokens; differs from `dim` only where pooling fuses towers."""
        return self.dim

    @abc.abstractmethod
    def processor_config(self) -> dict[str, Any]:
        """The preprocessing config, as hashed into `preprocess_hash`."""

    def batch_key(self, prepared: Prepared) -> Any:
        return None

    def decode_config(self) -> DecodeConfig:
        """How files and bytes are decoded for this encoder; part of its preprocessing (and hash)."""
        return DecodeConfig()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "revision": self.revision,
            "preprocess": self.preprocess_hash,
        }

    # -- shared machinery --------------------------------------------------------------------------
    def preprocess(self, image: Any, storage_options: dict | None = None) -> Prepared:
        """Any input kind (path, URL, bytes, PIL, numpy) -> RGB with EXIF applied -> model inputs."""
        return self.preprocess_image(load_image(image, self.decode_config(), storage_options=storage_options))

    def options(
        self,
        pooling: str | None = None,
        *,
        patches: bool = True,
        patch_level: str = "merged",
        deepstack: bool = False,
        output: str = "numpy",
        patch_dtype: str | torch.dtype = torch.float32,
    ) -> EmbedOptions:
        """Validate options before any work, so a bad option fails fast and clearly."""
        pooling = pooling or self.default_pooling
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if pooling == "cls" and not self.has_cls:
            raise ValueError(f"{self.name} has no CLS token; use pooling='mean', 'max' or 'none'")
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; use one of {', '.join(OUTPUTS)}")
        if patch_level not in PATCH_LEVELS:
            raise ValueError(f"unknown patch_level {patch_level!r}; use one of {', '.join(PATCH_LEVELS)}")
        if patch_level == "pre_merger" and not self.has_merger:
            raise ValueError(f"{self.name} does not offer pre-merger tokens (patch_level='pre_merger')")
        if deepstack and not self.has_deepstack:
            raise ValueError(f"{self.name} has no deepstack features")
        if not isinstance(patch_dtype, torch.dtype):
            patch_dtype = resolve_dtype(patch_dtype, torch.device("cpu"))
        return EmbedOptions(pooling, patches, patch_level, deepstack, output, patch_dtype)

    def embed(
        self,
        images: Iterable[Any],
        pooling: str | None = None,
        *,
        batch_tokens: int | None = None,
        storage_options: dict | None = None,
        **options: Any,
    ) -> EmbedResult:
        """Embed images of any kind; several images share one packed forward up to `batch_tokens`
        (None: default_batch_tokens of this encoder's device)."""
        opts = self.options(pooling, **options)
        prepared = [self.preprocess(img, storage_options) for img in images]
        return self.embed_prepared(prepared, opts, batch_tokens=batch_tokens)

    def embed_prepared(
        self, prepared: Sequence[Prepared], opts: EmbedOptions, *, batch_tokens: int | None = None
    ) -> EmbedResult:
        if not self.can_embed:
            raise RuntimeError(
                f"this {self.name} instance only preprocesses (load_preprocessor); use encoders.load"
            )
        outputs: list[TowerOutput | None] = [None] * len(prepared)
        budget = default_batch_tokens(self.device, batch_tokens)
        batches = plan_batches([p.seq_len for p in prepared], budget, [self.batch_key(p) for p in prepared])
        for idx in batches:
            for i, out in zip(idx, self.forward([prepared[i] for i in idx], opts), strict=True):
                outputs[i] = out
        return self.assemble(outputs, prepared, opts)

    def assemble(
        self, outputs: Sequence[TowerOutput], prepared: Sequence[Prepared], opts: EmbedOptions
    ) -> EmbedResult:
        pooled = None
        if opts.pooling != "none" and outputs:
            pooled = convert(torch.stack([pool(o, opts.pooling) for o in outputs]).float(), opts.output)
        elif opts.pooling != "none":
            pooled = convert(torch.empty(0, self.dim), opts.output)
        patches = (
            [convert(o.tokens.to(opts.patch_dtype), opts.output) for o in outputs] if opts.patches else []
        )
        extras: dict[str, list[Any]] = {}
        for o in outputs:
            for k, v in o.extras.items():
                value = convert(v.to(opts.patch_dtype), opts.output) if isinstance(v, torch.Tensor) else v
                extras.setdefault(k, []).append(value)
        fusion = [o.fusion for o in outputs if o.fusion is not None]
        return EmbedResult(
            pooled=pooled,
            patches=patches,
            grids=[o.grid for o in outputs],
            sizes=[(p.width, p.height) for p in prepared],
            extras=extras,
            fusion_weights=convert(torch.stack(fusion), opts.output) if fusion else None,
        )
