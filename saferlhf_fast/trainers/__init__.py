"""Training: one run core (``core``: steps, evaluation, checkpoints, resume, logging) under every command; the
supervised trainer (``supervised``) of SFT, RM / CM and DPO; the PPO family (``ppo``) with its algorithms as small
registered strategies (``algorithms``).  One config dataclass per command (``config``)."""
from .config import ConfigError, RunConfig, TrainConfig, add_config_arguments, config_from_args
from .core import RunCore, Trained
from .safety import find_checkpoint
from .score import CostConfig, CostTrainer, RewardConfig, RewardTrainer, ScoreConfig, ScoreNormalizer
from .sft import SFTConfig, SFTTrainer
from .supervised import Trainer

__all__ = [
    "ConfigError", "CostConfig", "CostTrainer", "RewardConfig", "RewardTrainer", "RunConfig", "RunCore",
    "SFTConfig", "SFTTrainer", "ScoreConfig", "ScoreNormalizer", "TrainConfig", "Trained", "Trainer",
    "add_config_arguments", "config_from_args", "find_checkpoint",
]
