"""Fractional GPU placement: the num_gpus math and first-fit decreasing packing."""

from __future__ import annotations

import pytest

from nosq.manager.memory import placement
from nosq.manager.memory.placement import Packing, first_fit, gpu_fraction, gpu_steps, pack

GIB = 1024**3
H100 = 80 * GIB


def test_public_api() -> None:
    assert set(placement.__all__) == {"STEPS_PER_GPU", "Packing", "first_fit", "gpu_fraction", "gpu_steps", "pack",
                                      "shared_fraction"}


def test_a_tiny_model_never_gets_zero_gpus() -> None:  # the NOS bug: int(bytes / total) == 0
    assert gpu_fraction(1, H100) == 0.01
    assert gpu_fraction(0, H100) == 0.01
    assert gpu_fraction(300 * 1024**2, H100) == 0.01


def test_fraction_rounds_up_exactly() -> None:
    assert gpu_fraction(7 * H100 // 100, H100) == 0.07  # exact: no float ceil(7.000000001) = 8
    assert gpu_fraction(7 * H100 // 100 + 1, H100) == 0.08
    assert gpu_fraction(H100 // 2, H100) == 0.5
    assert gpu_fraction(H100 // 3, H100) == 0.34
    assert gpu_fraction(H100, H100) == 1.0
    assert gpu_fraction(2 * H100, H100) == 1.0  # capped
    assert gpu_fraction(H100 // 3, H100, steps=1000) == 0.334
    assert gpu_steps(1, H100, steps=1) == 1


@pytest.mark.parametrize(("nbytes", "device_bytes", "steps", "message"), [
    (-1, H100, 100, "nbytes must be >= 0"),
    (1, 0, 100, "device_bytes must be > 0"),
    (1, H100, 0, "steps must be between 1 and 10000"),
    (1, H100, 100_000, "steps must be between 1 and 10000"),
])
def test_bad_inputs_say_what_is_wrong(nbytes: int, device_bytes: int, steps: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpu_fraction(nbytes, device_bytes, steps=steps)


def test_first_fit_decreasing_across_gpus() -> None:
    items = {"small": 10 * GIB, "huge": 60 * GIB, "mid": 30 * GIB, "mid2": 30 * GIB, "tiny": 1}
    result = pack(items, [H100, H100])
    # decreasing: huge(60) → gpu0; mid(30) → gpu1; mid2(30) → gpu1; small(10) → gpu0; tiny → gpu0
    assert result == Packing(
        gpu={"huge": 0, "mid": 1, "mid2": 1, "small": 0, "tiny": 0},
        num_gpus={"huge": 0.75, "mid": 0.38, "mid2": 0.38, "small": 0.13, "tiny": 0.01},
        unplaced=(),
    )
    assert result.fits
    for gpu in (0, 1):
        assert sum(f for name, f in result.num_gpus.items() if result.gpu[name] == gpu) <= 1.0


def test_what_does_not_fit_is_reported() -> None:
    result = pack({"a": 50 * GIB, "b": 50 * GIB, "c": 50 * GIB}, [H100, H100])
    assert result.gpu == {"a": 0, "b": 1}
    assert result.unplaced == ("c",)
    assert not result.fits


def test_budgets_leave_a_reserve() -> None:
    result = pack({"a": 40 * GIB, "b": 40 * GIB}, [H100], budget_bytes=[70 * GIB])
    assert result.gpu == {"a": 0}
    assert result.unplaced == ("b",)
    with pytest.raises(ValueError, match="budget_bytes has 1 entries but gpu_bytes has 2"):
        pack({}, [H100, H100], budget_bytes=[H100])


def test_rounded_fractions_must_fit_too() -> None:
    # three thirds fit by bytes, but Ray counts 0.34 + 0.34 + 0.34 > 1 on one GPU
    third = H100 // 3
    result = pack({"a": third, "b": third, "c": third}, [H100, H100])
    assert result.gpu == {"a": 0, "b": 0, "c": 1}
    tiny = pack({f"m{i}": 1 for i in range(150)}, [H100])  # 0.01 each: at most 100 per GPU
    assert len(tiny.gpu) == 100
    assert len(tiny.unplaced) == 50


def test_first_fit_for_one_model() -> None:
    assert first_fit(10, [5, 20, 30]) == 1
    assert first_fit(10, [10]) == 0
    assert first_fit(31, [5, 20, 30]) is None
    assert first_fit(0, []) is None


def test_replicas_without_a_budget_share_the_gpus_and_all_fit() -> None:
    assert placement.shared_fraction(1, 1.0) == 1.0
    assert placement.shared_fraction(2, 1.0) == 0.5
    assert placement.shared_fraction(3, 1.0) == 0.33  # 3 x 0.33 <= 1: every replica is placed
    assert placement.shared_fraction(3, 2.0) == 0.66
    assert placement.shared_fraction(1, 4.0) == 1.0  # one actor never asks for more than one GPU
    assert placement.shared_fraction(500, 1.0) == 0.01  # never 0
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        placement.shared_fraction(0, 1.0)
