from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvforge import PromptTokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden_hashes() -> dict:
    return json.loads((DATA / "vllm_block_hashes.json").read_text())


@pytest.fixture(scope="session")
def qwen3() -> PromptTokenizer:
    return PromptTokenizer.qwen3()
