import os
import sys

# Tests import their helpers (mock_models) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
# Deterministic, quiet CPU runs: two cores on CI machines.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny random model (policy checkpoint) shared by the trainer tests."""
    from trainer_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smol_tiny_dir(tmp_path_factory):
    """A tiny random model with SmolLM2's real tokenizer and chat template (tests/real_models.py)."""
    from real_models import save_tiny_with_smol_tokenizer

    return save_tiny_with_smol_tokenizer(tmp_path_factory.mktemp("smol-tiny"))


@pytest.fixture(scope="session")
def gsm8k(tmp_path_factory):
    """(train, test) GSM8K JSONL files (tests/real_models.py)."""
    from real_models import gsm8k_files

    return gsm8k_files(tmp_path_factory.mktemp("gsm8k"))
