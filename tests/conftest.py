"""Test-wide settings: never reach for the network."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def decoded_uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the demo decodes during the test (``demo.inputs._open`` calls), in order."""
    import demo.inputs

    calls: list[str] = []
    real_open = demo.inputs._open

    def counting_open(value):
        calls.append(str(value))
        return real_open(value)

    monkeypatch.setattr(demo.inputs, "_open", counting_open)
    return calls
