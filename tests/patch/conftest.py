"""Every patcher test leaves the shared models unpatched."""
import pytest

from m2iv import unpatch_model

from .common import MODELS


@pytest.fixture(autouse=True)
def _unpatch_everything():
    yield
    for model in MODELS.values():
        unpatch_model(model)
