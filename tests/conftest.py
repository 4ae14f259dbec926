import os
import sys

# Tests import their helpers (mock_models) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
# Deterministic, quiet CPU runs: two cores on CI machines.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
