"""uint8 pixels from decode to the device; the processor's rescale + normalise run there as a table.

Rescale and normalise map each channel's uint8 value on its own, so a (channels, 256) table made by
the processor's own `rescale` and `normalize` reproduces its output bit for bit. Decode tasks then
ship 4x fewer bytes to the actors, and the actors copy 4x fewer to the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from encoders._tower import processor_inputs


def model_pixels(processor: Any, image: Any) -> dict[str, np.ndarray]:
    """The processor's output with pixel_values as uint8 before rescale and normalise, where its
    resize kept whole values (PIL backends do); else its full output, already normalised."""
    out = processor_inputs(processor, image, do_rescale=False, do_normalize=False)
    raw = out["pixel_values"]
    if raw.dtype != np.uint8:
        whole = raw.astype(np.uint8)
        if not np.array_equal(whole, raw):  # resized in floating point: no table applies
            return processor_inputs(processor, image)
        out["pixel_values"] = whole
    return out


class PixelTable:
    """The processor's rescale + normalise of every uint8 value, per channel."""

    def __init__(self, processor: Any):
        channels = len(processor.image_mean) if getattr(processor, "do_normalize", False) else 3
        values: Any = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256)).copy()
        if getattr(processor, "do_rescale", False):
            values = processor.rescale(values, processor.rescale_factor)
        if getattr(processor, "do_normalize", False):
            values = processor.normalize(values, processor.image_mean, processor.image_std)
        self.channels = channels
        self.host = np.asarray(values, dtype=np.float32).reshape(channels * 256)
        self._devices: dict[torch.device, torch.Tensor] = {}

    def lookup(self, pixels: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        """float32 model input for uint8 PIXELS; CHANNEL (broadcastable) is each value's channel."""
        table = self._devices.get(pixels.device)
        if table is None:
            table = self._devices[pixels.device] = torch.from_numpy(self.host).to(pixels.device)
        return table[pixels.long() + channel * 256]

    def join(
        self,
        arrays: list[np.ndarray],
        join: Callable[[list[np.ndarray]], np.ndarray],
        channel: np.ndarray,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """JOIN (stack / concatenate) the batch's pixels and normalise them on DEVICE.

        CHANNEL: the channel index of each value of one item, broadcastable to the joined array."""
        if all(a.dtype == np.uint8 for a in arrays):
            pixels = torch.from_numpy(join(arrays)).to(device, non_blocking=True)
            return self.lookup(pixels, torch.from_numpy(channel).to(device)).to(dtype)
        floats = [self.host[a.astype(np.int64) + channel * 256] if a.dtype == np.uint8 else a for a in arrays]
        return torch.from_numpy(join(floats)).to(device, dtype, non_blocking=True)
