"""uint8 pixels normalised on the device equal the processor's own output, bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _support import TOWERS, smooth_image
from transformers import AutoImageProcessor

import encoders
from encoders._pixels import PixelTable
from encoders._tower import processor_inputs


def fed(enc, batch) -> np.ndarray:
    collated = enc.collate(batch)
    return (collated if enc.name == "dinov2" else collated.pixel_values).numpy()


@pytest.mark.parametrize("name", TOWERS)
def test_a_batch_mixing_uint8_and_normalised_items_is_normalised_once(name, checkpoint):
    """A processor that resized in floating point leaves normalised floats (model_pixels' fallback);
    a batch mixing them with uint8 items must feed every item normalised exactly once."""
    enc = encoders.load(name, weights=checkpoint(name))
    images = [smooth_image(120, 200, 1), smooth_image(90, 300, 2)]
    uint8 = [enc.preprocess(im) for im in images]
    full = processor_inputs(enc.processor, images[1])["pixel_values"]
    full = np.ascontiguousarray(full[0] if name == "dinov2" else full)
    floats = dataclasses.replace(uint8[1], pixel_values=full)
    assert uint8[0].pixel_values.dtype == np.uint8 and floats.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(fed(enc, [uint8[0], floats]), fed(enc, uint8))


def test_the_table_is_the_processors_rescale_and_normalise(checkpoint):
    processor = AutoImageProcessor.from_pretrained(str(checkpoint("dinov2")), backend="pil")
    table = PixelTable(processor)
    values = np.arange(256, dtype=np.float64)
    for c, (mean, std) in enumerate(zip(processor.image_mean, processor.image_std, strict=True)):
        rescaled = (values * processor.rescale_factor).astype(np.float32)
        expected = (rescaled - np.float32(mean)) / np.float32(std)
        np.testing.assert_allclose(table.host[c * 256 : (c + 1) * 256], expected, rtol=1e-6)
    # a processor that neither rescales nor normalises leaves the values as they are
    plain = PixelTable(AutoImageProcessor.from_pretrained(
        str(checkpoint("dinov2")), backend="pil", do_rescale=False, do_normalize=False
    ))  # fmt: skip
    np.testing.assert_array_equal(plain.host, np.tile(np.arange(256, dtype=np.float32), 3))
