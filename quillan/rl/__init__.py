"""RL on verifiable rewards: GRPO/DAPO advantages and losses, DAPO shaping, CCRL council terms."""

from quillan.rl.grpo import (
    ADVANTAGE_MODES,
    LOSS_TYPES,
    council_entropy,
    dynamic_sample,
    group_advantages,
    multi_objective_reward,
    overlong_penalty,
    policy_loss,
)

__all__ = ["ADVANTAGE_MODES", "LOSS_TYPES", "council_entropy", "dynamic_sample", "group_advantages",
           "multi_objective_reward", "overlong_penalty", "policy_loss"]
