"""The reward registry: registration checks, params and column renames, custom reward files."""

import pytest

from soup.errors import ConfigError, SoupError
from soup.rewards import registry
from soup.rewards.registry import get_reward, load_reward_file, register_reward, required_columns, reward_names


def test_builtin_rewards_are_registered_with_their_columns():
    assert reward_names() == ["accuracy", "code", "format", "json_schema", "math"]
    assert required_columns("accuracy") == ("answer",) and required_columns("math") == ("answer",)
    assert required_columns("code") == ("tests",) and required_columns("json_schema") == ("schema",)
    assert required_columns("format") == ()
    assert registry.REWARDS["code"].defaults() == {"timeout_s": 5.0, "memory_mb": 1024, "isolation": "auto",
                                                 "workers": 1}


def test_a_column_can_be_renamed_per_run():
    assert required_columns("accuracy", answer_column="solution") == ("solution",)
    accuracy = get_reward("accuracy", answer_column="solution")
    assert accuracy.columns == ("solution",)
    # GSM8K's original column: the full solution ending in '#### N'.
    assert accuracy(["\\boxed{72}", "\\boxed{71}"], solution=["... #### 72"] * 2, answer=["0", "0"]) == [1.0, 0.0]


def test_a_missing_column_names_the_column_and_the_rename():
    with pytest.raises(SoupError, match="(?s)needs the column 'answer'.*answer_column"):
        get_reward("accuracy")(["\\boxed{1}"], question=["q"])


def test_unknown_names_and_params_are_config_errors():
    with pytest.raises(ConfigError, match="(?s)no reward named 'acuracy'.*accuracy, code, format, json_schema, math"):
        get_reward("acuracy")
    with pytest.raises(ConfigError, match="does not take parameter\\(s\\) timeout_s; it accepts: answer_column"):
        get_reward("accuracy", timeout_s=3)
    with pytest.raises(ConfigError, match="not a regular expression"):
        get_reward("format", pattern="<think>(")
    with pytest.raises(ConfigError, match="isolation is 'auto' or 'none'"):
        get_reward("code", isolation="chroot")


def test_params_reach_the_reward_and_data_columns_cannot_set_them():
    format_ = get_reward("format", pattern=r"ANSWER: \d+")
    assert format_(["ANSWER: 3", "answer: 3"]) == [1.0, 0.0]
    # A column named like a param is ignored: only declared columns and bound params reach fn.
    assert get_reward("format")(["ANSWER: 3"], pattern=[r"ANSWER: \d+"]) == [0.0]


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))

    def documented(completions, *, answer, strict=False):
        """A reward."""
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(documented)
    with pytest.raises(ValueError, match="needs a docstring"):
        register_reward("bare")(lambda completions: [])
    with pytest.raises(ValueError, match="keyword-only"):
        register_reward("typo", columns=("answr",))(documented)

    def no_default(completions, *, strict):
        """A reward."""

    with pytest.raises(ValueError, match="with defaults"):
        register_reward("no_default", params=("strict",))(no_default)
    register_reward("mine", columns=("answer",), params=("strict",))(documented)
    assert required_columns("mine") == ("answer",) and get_reward("mine", strict=True)(["a"], answer=["b"]) == [0.0]


def test_a_custom_reward_comes_from_the_file_named(tmp_path):
    file = tmp_path / "length_reward.py"
    file.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Unit:\n    size: float = 1.0\n\n"
                    "def reward_fn(completions, **columns):\n"
                    "    return [Unit().size * len(c) + len(columns) for c in completions]\n")
    reward = get_reward(str(file))
    assert reward.name == str(file) and reward.columns == () and required_columns(str(file)) == ()
    assert reward(["ab", "abcd"], answer=["x", "y"]) == [3.0, 5.0]  # it receives every column
    assert load_reward_file(file)(["abc"]) == [3.0]


def test_custom_reward_file_errors_name_the_path_and_the_fix(tmp_path):
    cases = {"missing.py": (None, "no such file"), "empty.py": ("x = 1\n", "defines no reward_fn"),
             "broken.py": ("import not_a_module_xyz\n", "importing it raised ModuleNotFoundError")}
    for name, (source, says) in cases.items():
        path = tmp_path / name
        if source is not None:
            path.write_text(source)
        with pytest.raises(ConfigError) as err:
            get_reward(str(path))
        assert says in str(err.value) and str(path) in str(err.value) and "\n  fix: " in str(err.value)
    (tmp_path / "ok.py").write_text("def reward_fn(completions, **columns):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match="takes no params"):
        get_reward(str(tmp_path / "ok.py"), weight=2)
