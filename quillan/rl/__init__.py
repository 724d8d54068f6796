"""RL on verifiable rewards: GRPO/DAPO advantages and losses, DAPO shaping, CCRL council terms,
rollouts scored by the task verifiers, and the training loop (`GRPOTrainer`)."""

from quillan.rl.config import GRPOConfig, RewardWeights
from quillan.rl.grpo import (
    ADVANTAGE_MODES,
    LOSS_TYPES,
    council_entropy,
    dynamic_sample,
    group_advantages,
    informative_probability,
    multi_objective_reward,
    overlong_penalty,
    policy_loss,
)
from quillan.rl.rollout import Group, completion_logprobs, pack_groups, reward_parts, sample_groups
from quillan.errors import NonFiniteError
from quillan.rl.trainer import GRPOTrainer

__all__ = ["ADVANTAGE_MODES", "LOSS_TYPES", "GRPOConfig", "GRPOTrainer", "Group", "NonFiniteError", "RewardWeights",
           "completion_logprobs", "council_entropy", "dynamic_sample", "group_advantages", "informative_probability",
           "multi_objective_reward",
           "overlong_penalty", "pack_groups", "policy_loss", "reward_parts", "sample_groups"]
