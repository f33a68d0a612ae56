"""Rollouts for online RL: sampling completions from the policy being trained."""

from soup.rollout.engine import Rollout, SamplingParams, sample

__all__ = ["Rollout", "SamplingParams", "sample"]
