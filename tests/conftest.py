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
