"""Verifiable rewards for online RL, by name (soup/rewards/registry.py explains the contract).

    rewards = [(name, get_reward(name), weight) for name, weight in zip(names, weights)]
    for name in names: required_columns(name)   # check the data before any generation
    scores = score(rewards, completions, columns)  # .total, .per_reward, .counts, .metrics()

Built in (soup/rewards/builtin.py): accuracy, math, format, code (sandbox.py), json_schema;
or the path of a .py file that defines reward_fn(completions, **columns).
"""

# registry first: it imports the built-in rewards, then combine (which needs registry's types).
from soup.rewards.registry import (REWARDS, Reward, RewardError, RewardOutput, RewardSpec, get_reward, load_reward_file,
                                   register_reward, required_columns, reward_names)
from soup.rewards.combine import Scores, score  # noqa: E402  (after registry, see above)

__all__ = ["REWARDS", "Reward", "RewardError", "RewardOutput", "RewardSpec", "Scores", "get_reward",
           "load_reward_file", "register_reward", "required_columns", "reward_names", "score"]
