"""Turning decoded request values into one model batch and the model's output back into items.

Pure functions, no Ray: ``collate`` stacks items into a tensor where it can, ``split`` cuts an
output into one value per item (or raises :class:`OutputMismatch`), ``to_numpy`` makes outputs
encodable, and ``shape_groups`` partitions a batch whose tensors differ in shape.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nosq.producer.errors import NosqError

__all__ = ["OutputMismatch", "collate", "shape_groups", "split", "to_numpy"]

_NUMBER_TYPES = (bool, int, float)


class OutputMismatch(NosqError):
    """A model output that cannot be cut into exactly one value per input item."""


def collate(items: list[Any]) -> Any:
    """One model input for ``items``.

    * numpy arrays and/or torch tensors, all of one shape and dtype: one stacked tensor;
    * lists (nested) of numbers, all of one shape: one stacked tensor (dtypes promoted);
    * anything else: the plain list, unchanged.
    """
    if not items:
        return items
    if all(isinstance(item, (np.ndarray, torch.Tensor)) for item in items):
        return _stack_arrays(items)
    if all(isinstance(item, (list, tuple)) for item in items):
        return _stack_number_lists(items)
    return items


def _stack_arrays(items: list[Any]) -> Any:
    shape = tuple(items[0].shape)
    if any(tuple(item.shape) != shape for item in items):
        return items
    try:
        if all(isinstance(item, np.ndarray) for item in items):
            if any(item.dtype != items[0].dtype for item in items):
                return items
            stacked = np.stack(items)  # one copy: the result is writable even if the items are not
            if not stacked.dtype.isnative:
                stacked = stacked.astype(stacked.dtype.newbyteorder("="))
            return torch.from_numpy(stacked)
        tensors = [_as_tensor(item) for item in items]
        if any(t.dtype != tensors[0].dtype for t in tensors):
            return items
        return torch.stack(tensors)
    except (TypeError, ValueError, RuntimeError):  # a dtype torch has no counterpart for
        return items


def _as_tensor(item: np.ndarray[Any, Any] | torch.Tensor) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if not item.flags.writeable or not item.dtype.isnative:
        item = np.array(item, dtype=item.dtype.newbyteorder("="))
    return torch.from_numpy(item)


def _stack_number_lists(items: list[Any]) -> Any:
    try:
        tensors = [torch.as_tensor(item) for item in items]
    except (TypeError, ValueError, RuntimeError, OverflowError):  # ragged, strings, dicts...
        return items
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        return items
    dtype = first.dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return torch.stack([t.to(dtype) for t in tensors])


def shape_groups(items: Sequence[Any]) -> list[list[int]]:
    """Indices of ``items`` grouped so that each group's arrays/tensors share shape and dtype.

    Groups keep the order of first appearance; everything that is not an array or tensor goes
    into one group. Used when ``collate`` could not stack a mixed batch.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        key: Hashable = None
        if isinstance(item, (np.ndarray, torch.Tensor)):
            key = (type(item).__name__, tuple(item.shape), str(item.dtype))
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def split(output: Any, n: int) -> list[Any]:
    """Cut a batch output into ``n`` per-item values, or raise :class:`OutputMismatch`.

    Accepts a tensor (or numpy array) whose first dimension is ``n``, a list/tuple of length
    ``n``, or a dict whose values are all such tensors/arrays/sequences.
    """
    if isinstance(output, torch.Tensor):
        _check_count(_first_dim(output, n), n, "tensor")
        return list(output.detach().cpu().unbind(0))
    if isinstance(output, np.ndarray):
        _check_count(_first_dim(output, n), n, "array")
        return list(output)
    if isinstance(output, (list, tuple)):
        _check_count(len(output), n, type(output).__name__)
        return list(output)
    if isinstance(output, Mapping):
        columns = {key: split(value, n) for key, value in output.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(n)]
    raise OutputMismatch(
        f"model returned a {type(output).__name__} for a batch of {n}: return a tensor whose first "
        f"dimension is {n}, a list of {n} values, or a dict of such tensors"
    )


def _first_dim(value: torch.Tensor | np.ndarray[Any, Any], n: int) -> int:
    if value.ndim == 0:
        raise OutputMismatch(
            f"model returned a 0-d tensor for a batch of {n}: it needs a first dimension of {n}, "
            "one entry per input"
        )
    return int(value.shape[0])


def _check_count(got: int, n: int, what: str) -> None:
    if got != n:
        raise OutputMismatch(f"model returned {got} outputs for a batch of {n} (as a {what})")


def to_numpy(value: Any) -> Any:
    """``value`` with every torch tensor (also inside dicts, lists, tuples) made a numpy array.

    bfloat16 and other dtypes numpy lacks become float32 (complex32 becomes complex64).
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.complex32:
            tensor = tensor.to(torch.complex64)
        try:
            return tensor.numpy()
        except TypeError:  # bfloat16, float8...: no numpy dtype
            return tensor.float().numpy()
    if isinstance(value, dict):
        return {key: to_numpy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_numpy(item) for item in value]
    return value
