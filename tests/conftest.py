import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("EDGEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext-2" / "wiki.test.raw").is_file():
        pytest.skip(f"evaluation data not found at {DATA}")
    return DATA


@pytest.fixture(params=FAMILIES)
def tiny(request):
    from edgeprune.models.tiny import build_tiny

    return build_tiny(request.param)


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session. Tests must not modify it."""
    from edgeprune.models import load

    return load("default")


@pytest.fixture
def fresh_default():
    from edgeprune.models import load

    return load("default")
