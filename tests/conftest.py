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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (about a minute more)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: `python -m pytest --runslow` runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
