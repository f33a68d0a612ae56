"""score: the weighted sum of checked rewards, each reward's values, counts and metrics."""

import math

import pytest

from soup.errors import SoupError
from soup.rewards import RewardError, RewardOutput, get_reward, score


def constant(values):
    return lambda completions, **columns: values


def test_weighted_sum_with_none_counted_as_zero():
    rewards = [("format", get_reward("format"), 0.5), ("accuracy", get_reward("accuracy"), 2.0)]
    completions = ["<think>2+2</think> \\boxed{4}", "\\boxed{5}", "<think>?</think> \\boxed{6}"]
    scores = score(rewards, completions, {"answer": ["4", "4", None]})
    # by hand: 0.5*1 + 2*1, 0.5*0 + 2*0, 0.5*1 + (None -> 0)
    assert scores.total == [2.5, 0.0, 0.5]
    assert scores.per_reward == {"format": [1.0, 0.0, 1.0], "accuracy": [1.0, 0.0, None]}
    assert scores.counts == {}


def test_metrics_per_reward_skip_none():
    scores = score([("a", constant([1.0, 0.0, None, 1.0]), 1.0), ("b", constant([0.5, 0.5, 0.5, 0.5]), 2.0)],
                   ["w", "x", "y", "z"], {})
    assert scores.total == [2.0, 1.0, 1.0, 2.0]
    metrics = scores.metrics()
    assert metrics["reward"] == 1.5 and metrics["reward_std"] == 0.5  # population std of [2, 1, 1, 2]
    assert metrics["rewards/a/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/a/std"] == pytest.approx(math.sqrt(2 / 9))  # [1, 0, 1] around 2/3
    assert metrics["rewards/b/mean"] == 0.5 and metrics["rewards/b/std"] == 0.0


def test_counts_from_reward_outputs_are_named_by_reward():
    scores = score([("code", constant(RewardOutput([1.0, 0.0], {"timeout": 1, "passed": 1})), 1.0)], ["a", "b"], {})
    assert scores.total == [1.0, 0.0]
    assert scores.counts == {"code/timeout": 1, "code/passed": 1}
    assert scores.metrics()["rewards/code/timeout"] == 1.0


def test_numpy_like_and_int_values_are_accepted():
    assert score([("r", constant([1, 0.5]), 1.0)], ["a", "b"], {}).per_reward == {"r": [1.0, 0.5]}


@pytest.mark.parametrize("output, says, index", [
    ([1.0], "returned 1 values for 2 completions", None),
    ("1.0", "returned a str, not a list", None),
    ([1.0, float("nan")], "returned nan for completion 1 ('second completion')", 1),
    ([float("inf"), 0.0], "returned inf for completion 0 ('first completion')", 0),
    ([1.0, "high"], "returned 'high' (str) for completion 1", 1),
    ([True, 0.0], "returned True (bool) for completion 0", 0),
])
def test_bad_output_names_the_reward_the_completion_and_the_fix(output, says, index):
    with pytest.raises(RewardError) as err:
        score([("mine", constant(output), 1.0)], ["first completion", "second completion"], {})
    assert says in str(err.value) and "reward 'mine'" in str(err.value) and "\n  fix: " in str(err.value)
    assert err.value.reward == "mine" and err.value.index == index


def test_an_exception_in_a_reward_names_it(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("def reward_fn(completions, **columns):\n    raise KeyError('answer')\n")
    with pytest.raises(RewardError, match=f"reward '{file}' raised KeyError: 'answer'\n  fix: "):
        score([(str(file), get_reward(str(file)), 1.0)], ["a"], {})


def test_a_soup_error_from_a_reward_passes_through_unchanged():
    def needs_setup(completions, **columns):
        raise SoupError("reward needs X.\n  fix: install X")

    with pytest.raises(SoupError, match="^reward needs X"):
        score([("r", needs_setup, 1.0)], ["a"], {})


def test_listing_a_reward_twice_is_an_error():
    with pytest.raises(SoupError, match="more than once"):
        score([("a", constant([1.0]), 1.0), ("a", constant([1.0]), 1.0)], ["x"], {})


def test_columns_must_have_one_value_per_completion():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        score([("a", constant([1.0, 1.0]), 1.0)], ["x", "y"], {"answer": ["1"]})


def test_reward_weight_pairs_are_accepted_too():
    # (reward, weight) pairs of anything with .name and .fn: a Reward from get_reward, or a
    # RewardSpec built around a function that takes every column.
    from soup.rewards import RewardSpec

    def says_dog(completions, **columns):
        return [float("dog" in c) for c in completions]

    pairs = [(get_reward("accuracy"), 1.0), (RewardSpec("dog", says_dog, (), ""), 0.5)]
    scores = score(pairs, ["a dog: \\boxed{3}", "\\boxed{4}"], {"answer": ["3", "3"], "question": ["q", "q"]})
    assert scores.total == [1.5, 0.0] and scores.per_reward == {"accuracy": [1.0, 0.0], "dog": [1.0, 0.0]}
