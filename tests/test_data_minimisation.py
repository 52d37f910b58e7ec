"""The docs' table of what each method sends (docs/methods.md) matches every real message."""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cmfl_flower.methods.base import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, from_record
from tests.test_strategies import run

README = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
MARKER = "<!-- data-minimisation table"


@dataclass(frozen=True)
class Row:
    records: set[str]
    optional: set[str]  # records marked "(from round 2)" / present only some rounds
    config: set[str]
    optional_config: set[str]  # marked "(...)": sent only by some strategies
    keys: re.Pattern[str] | None
    shapes: str
    size: str
    metrics: set[str]
    optional_metrics: set[str]  # marked "(...)": present only in some rounds or strategies


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _marked(names: set[str], cell: str) -> set[str]:
    """The names followed by a parenthesis: present only in some rounds or runs."""
    return {n for n in names if re.search(rf"`{re.escape(n)}` \(", cell)}


def _key_pattern(cell: str) -> re.Pattern[str] | None:
    names = _names(cell.split(":", 1)[0])  # the keys come before the colon
    if not names:
        return None
    return re.compile("|".join(_key_regex(name) for name in names))


def _key_regex(name: str) -> str:
    pattern = re.sub(r"<\w+>", r"\\d+", re.escape(name))
    return re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m[1].replace(",", "|") + ")", pattern)


def _table() -> dict[tuple[str, str], Row]:
    lines = README.read_text().split(MARKER, 1)[1].splitlines()[1:]
    table: dict[tuple[str, str], Row] = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        methods, direction, records, config, keys, shapes, size, metrics = cells
        record_names, config_names = set(_names(records)), set(_names(config))
        keys_of = table[(methods, "server → client")].keys if keys.startswith("the same") else None
        row = Row(
            record_names,
            _marked(record_names, records),
            config_names,
            _marked(config_names, config),
            keys_of or _key_pattern(keys),
            shapes,
            size,
            set(_names(metrics)),
            _marked(set(_names(metrics)), metrics),
        )
        for method in _names(methods):
            table[(method, direction)] = row
        table[(methods, direction)] = row
    return table


def _check_arrays(row: Row, arrays: dict[str, np.ndarray]) -> None:
    assert row.keys is not None
    for key in arrays:
        assert row.keys.fullmatch(key), key
    if "n_tokens" in row.shapes and arrays:  # round 1 relays nothing
        _check_packed_tokens(row, arrays)
    elif arrays:
        assert all(value.dtype == np.float32 for value in arrays.values())
        stated = {
            tuple(int(n) for n in s.split(",")) for s in re.findall(r"\(([\d, ]+)\)", row.shapes)
        }
        assert {v.shape for v in arrays.values()} == stated
        assert sum(v.nbytes for v in arrays.values()) == int(row.size.split()[0])


def _check_packed_tokens(row: Row, arrays: dict[str, np.ndarray]) -> None:
    """``vectors`` (R, D) float32 and ``index`` (E, columns) int32, sizes as stated."""
    dim = int(re.search(r"n_tokens summed, (\d+)", row.shapes)[1])  # type: ignore[index]
    columns = int(re.search(r"entries, (\d+)", row.shapes)[1])  # type: ignore[index]
    per_token, per_entry = (int(n) for n in re.findall(r"(\d+) per", row.size))
    vectors, index = arrays["vectors"], arrays["index"]
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and vectors.shape[1] == dim
    assert index.dtype == np.int32 and index.ndim == 2 and index.shape[1] == columns
    assert int(index[:, -1].sum()) == len(vectors)
    assert vectors.nbytes == per_token * len(vectors)
    assert index.nbytes == per_entry * len(index)


@pytest.mark.parametrize(
    ("method", "strategy"),
    [
        ("local-only", "fedavg"),
        ("encoder-lora", "fedavg"),
        ("encoder-lora", "fedprox"),
        ("cmfl-relay", "fedavg"),
        ("local-only-tokens", "fedavg"),
        ("names-generation", "fedavg"),
    ],
)
def test_every_message_matches_the_readme_table(tmp_path, method, strategy):
    table = _table()
    grid, _, _ = run(tmp_path, method, num_nodes=2, rounds=2, strategy=strategy)
    for direction, messages in (("server → client", grid.sent), ("client → server", grid.replies)):
        row = table[(method, direction)]
        for message in messages:
            content = message.content
            assert row.records - row.optional <= set(content) <= row.records
            if CONFIG_KEY in content:
                sent = set(content[CONFIG_KEY])
                assert row.config - row.optional_config <= sent <= row.config
                assert ("proximal-mu" in sent) == (strategy == "fedprox")
            if METRICS_KEY in content:
                sent = set(content[METRICS_KEY])
                named = [re.compile(_key_regex(name)) for name in row.metrics]  # `kept-s<id>`
                assert all(any(p.fullmatch(key) for p in named) for key in sent), sent
                assert {n for n in row.metrics - row.optional_metrics if "<" not in n} <= sent
            if ARRAYS_KEY in content:
                _check_arrays(row, from_record(content[ARRAYS_KEY]))
            elif row.keys is not None and direction == "client → server":
                pytest.fail(f"{method}: a reply without arrays")
    if row.keys is not None:  # arrays really travel in round 2
        assert all(ARRAYS_KEY in m.content for m in grid.sent[2:])
