"""collate / split / to_numpy / shape_groups: pure functions, no Ray, no model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nosq.workers.batching import OutputMismatch, collate, shape_groups, split, to_numpy


@pytest.mark.filterwarnings("error")  # a read-only array must not reach torch.from_numpy
def test_collate_readonly_numpy() -> None:
    items = [np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32).reshape(2, 3)] * 4
    assert not items[0].flags.writeable
    batch = collate(items)
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (4, 2, 3)
    assert batch.dtype == torch.float32
    assert torch.equal(batch[3], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    batch += 1  # writable, and the items are untouched
    assert items[0][0, 0] == 0


def test_collate_big_endian_numpy() -> None:
    items = [np.arange(3, dtype=">f4"), np.arange(3, dtype=">f4")]
    batch = collate(items)
    assert isinstance(batch, torch.Tensor)
    assert torch.equal(batch[1], torch.arange(3, dtype=torch.float32))


def test_collate_tensors_and_mixed() -> None:
    tensors = [torch.full((2,), float(i)) for i in range(3)]
    assert torch.equal(collate(tensors), torch.stack(tensors))
    mixed = [np.zeros(2, dtype=np.float32), torch.ones(2)]
    assert torch.equal(collate(mixed), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize(
    "items",
    [
        [np.zeros(2, dtype=np.float32), np.zeros(3, dtype=np.float32)],
        [np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float64)],
        [torch.zeros(2), torch.zeros(2, dtype=torch.int64)],
        [np.zeros(2, dtype=np.float32), torch.zeros(2, dtype=torch.float64)],
        [np.array(["a", "b"]), np.array(["c", "d"])],  # no torch dtype
        [np.zeros(2), [0.0, 0.0]],
        [[1, 2], [3]],  # ragged
        [["a"], ["b"]],
        [{"x": 1}, {"x": 2}],
        [1, 2.5],
        ["text", "more"],
        [[1, 2], [3, 4, 5]],
    ],
)
def test_collate_returns_plain_list(items: list[Any]) -> None:
    batch = collate(items)
    assert isinstance(batch, list)
    assert len(batch) == len(items)
    assert all(a is b for a, b in zip(batch, items, strict=True))


def test_collate_number_lists() -> None:
    batch = collate([[1.0, 2.0], [3.0, 4.0]])
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    promoted = collate([[1, 2], [3.5, 4]])
    assert promoted.dtype == torch.float32
    assert torch.equal(promoted, torch.tensor([[1.0, 2.0], [3.5, 4.0]]))
    ints = collate([[[1], [2]], ([3], [4])])
    assert ints.dtype == torch.int64
    assert ints.shape == (2, 2, 1)


def test_collate_empty() -> None:
    assert collate([]) == []


def test_split_tensor() -> None:
    out = torch.arange(12.0, requires_grad=True).reshape(4, 3)
    parts = split(out, 4)
    assert len(parts) == 4
    assert all(not p.requires_grad and p.device.type == "cpu" for p in parts)
    assert torch.equal(parts[2], torch.tensor([6.0, 7.0, 8.0]))


@pytest.mark.parametrize(
    "output",
    [torch.zeros(3, 2), np.zeros((3, 2)), [1, 2, 3], (1, 2, 3), {"a": torch.zeros(3), "b": [1, 2, 3]}],
)
def test_split_wrong_count(output: Any) -> None:
    with pytest.raises(OutputMismatch, match="model returned 3 outputs for a batch of 4"):
        split(output, 4)


@pytest.mark.parametrize("output", [torch.tensor(1.0), np.float32(1.0), None, "abc", 3])
def test_split_unsplittable(output: Any) -> None:
    with pytest.raises(OutputMismatch, match="batch of 2"):
        split(output, 2)


def test_split_sequences_and_dicts() -> None:
    assert split([1, "a"], 2) == [1, "a"]
    assert split((1, 2), 2) == [1, 2]
    parts = split({"logits": torch.tensor([[1.0], [2.0]]), "label": ["x", "y"]}, 2)
    assert parts[1]["label"] == "y"
    assert torch.equal(parts[1]["logits"], torch.tensor([2.0]))
    rows = split(np.arange(4).reshape(2, 2), 2)
    assert rows[1].tolist() == [2, 3]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_to_numpy() -> None:
    value = {
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "rows": [torch.zeros(1, dtype=torch.int8), (torch.ones(1),)],
        "other": "kept",
    }
    out = to_numpy(value)
    assert out["bf16"].dtype == np.float32
    assert out["rows"][0].dtype == np.int8
    assert isinstance(out["rows"][1][0], np.ndarray)
    assert out["other"] == "kept"
    assert to_numpy(torch.zeros(2, requires_grad=True)).dtype == np.float32
    assert to_numpy(torch.zeros(1, dtype=torch.complex32)).dtype == np.complex64


def test_shape_groups() -> None:
    items = [np.zeros(2), np.zeros(3), {"x": 1}, np.zeros(2), torch.zeros(2), "s", np.zeros(2, dtype=np.int8)]
    assert shape_groups(items) == [[0, 3], [1], [2, 5], [4], [6]]
