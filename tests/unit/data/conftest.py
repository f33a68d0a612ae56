"""Fixtures for the data tests: the byte tokenizer and tiny files written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from soup.config.schema import DataConfig
from soup.models.tokenizer import build_byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """write_jsonl(rows, name="rows.jsonl") -> path; rows may be dicts or raw strings (written as-is)."""

    def write(rows: list[Any], name: str = "rows.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture
def data_config():
    """data_config(**overrides) -> DataConfig for a file run (the tokenizer's own chat template)."""

    def make(**overrides: Any) -> DataConfig:
        values: dict[str, Any] = dict(name="file")
        values.update(overrides)
        return DataConfig(**values)

    return make
