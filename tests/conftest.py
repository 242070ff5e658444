import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, on a single CPU thread budget."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    return FIXTURES


@pytest.fixture
def tokenizer_path():
    return os.path.join(ROOT, "assets", "tokenizer.model")
