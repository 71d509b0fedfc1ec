"""Fixtures shared by the storage tests."""

import pytest
from PIL import ImageFile


@pytest.fixture
def load_spy(monkeypatch):
    """Records every pixel load, to prove a file is refused from its header alone."""
    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return loaded
