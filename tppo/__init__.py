"""tppo: Truncated PPO (T-PPO) for training reasoning language models with verifiable rewards.

Core math: :mod:`tppo.algos`. Rollout engine: :mod:`tppo.rollout`. Models: :mod:`tppo.models`.
"""

__version__ = "0.1.0"
