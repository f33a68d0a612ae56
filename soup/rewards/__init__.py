"""Rewards for online RL: verifiable checks of a completion, by name (soup/rewards/registry.py)."""

from soup.rewards.registry import REWARDS, RewardSpec, Scores, get_reward, register_reward, score

__all__ = ["REWARDS", "RewardSpec", "Scores", "get_reward", "register_reward", "score"]
