"""Examples as batches: what the Hessians sum over and what scoring streams through, whatever the user's data are.

A *batch* is whatever the data yield and the loss reads: an `(x, y)` pair of tensors (the common case), a dict of
tensors (`{"input_ids": ..., "label": ...}`), or any nesting of tuples, lists and dicts whose tensors share their
first dimension (the examples). `Examples` gives one interface over the ways such data come:

* `(x, y)` tensors, or an object with `.x` / `.y` (msif's tasks): rows are indexed directly, so scoring all of them
  never copies x (which may be memory-mapped and larger than memory);
* a map-style `torch.utils.data.Dataset` (`len` and `[i]`), collated with `collate_fn` (torch's default_collate
  unless the DataLoader it came in says otherwise): rows are read batch by batch, never all at once;
* a `DataLoader` over a map-style data set: its data set and collate_fn are used, with msif's own batch sizes;
* any other iterable of batches (an `IterableDataset`'s loader, a generator function's output wrapped in a list):
  read in order, one pass per use; the Hessian sample keeps only the sampled rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from msif.errors import MsifError

Batch = Any  # a pytree of tensors whose first dimension indexes the examples


def leaves(batch: Batch) -> list[torch.Tensor]:
    return [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]


def batch_size(batch: Batch) -> int:
    """Examples in a batch: the first dimension its tensors share."""
    sizes = {int(t.shape[0]) for t in leaves(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise MsifError(
            f"A batch's tensors do not share one first dimension (sizes {sorted(sizes) or 'none'}).",
            "Each batch must hold tensors whose first dimension indexes the examples (e.g. x of shape (b, ...) and "
            "y of shape (b,)).",
        )
    return sizes.pop()


def take(batch: Batch, rows) -> Batch:
    """The rows `rows` (a slice or an index tensor) of every tensor in the batch."""
    return tree_map(lambda t: t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def to_device(batch: Batch, device) -> Batch:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def per_example(batch: Batch) -> Batch:
    """Each tensor with a dimension of one after the first, so that vmapping over the first dimension hands the loss
    batches of one example."""
    return tree_map(lambda t: t.unsqueeze(1) if isinstance(t, torch.Tensor) and t.dim() > 0 else t, batch)


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch from several of the same structure."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    cols = list(zip(*[f[0] for f in flat], strict=True))
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten([torch.cat(c) if isinstance(c[0], torch.Tensor) else c[0] for c in cols], spec)


class Examples:
    """An indexed set of examples, read as batches (see the module docstring for what it accepts)."""

    def __init__(self, data, what: str = "examples"):
        self.what = what
        self._pair = self._dataset = self._iterable = None
        self.collate: Callable = default_collate
        if hasattr(data, "x") and hasattr(data, "y") and isinstance(data.x, torch.Tensor):
            self._pair = (data.x, data.y)
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            self._pair = (data[0], data[1])
        elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            self._dataset, self.collate = data.dataset, data.collate_fn or default_collate
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
            self._dataset = data
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
            self._iterable = data
        else:
            raise MsifError(
                f"Cannot read {what} from a {type(data).__name__}.",
                "Pass (x, y) tensors, a map-style torch Dataset, a DataLoader, or an iterable of batches.",
            )
        if self._pair is not None and len(self._pair[0]) != len(self._pair[1]):
            raise MsifError(
                f"The {what} have {len(self._pair[0])} inputs but {len(self._pair[1])} labels.",
                "Pass x and y with one row per example.",
            )
        self._len: int | None = None

    @property
    def random_access(self) -> bool:
        return self._iterable is None

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, y) when the examples are two tensors, else None."""
        return self._pair

    def __len__(self) -> int:
        if self._len is None:
            if self._pair is not None:
                self._len = len(self._pair[1])
            elif self._dataset is not None:
                self._len = len(self._dataset)
            else:  # one counting pass over an iterable of batches
                self._len = sum(batch_size(b) for b in self._iterable)
        return self._len

    def batches(self, size: int, rows: torch.Tensor | None = None) -> Iterator[Batch]:
        """The examples `rows` (all, in order, when None) in batches of at most `size`; iterable data are read in
        their own batches and only the wanted rows kept."""
        if self._pair is not None:
            x, y = self._pair
            n = len(y)
            if rows is None:
                for i in range(0, n, size):
                    yield (x[i : i + size], y[i : i + size])
            else:
                for i in range(0, len(rows), size):
                    idx = rows[i : i + size]
                    yield (x[idx], y[idx])
        elif self._dataset is not None:
            order = torch.arange(len(self)) if rows is None else torch.as_tensor(rows)
            for i in range(0, len(order), size):
                yield self.collate([self._dataset[int(j)] for j in order[i : i + size]])
        else:
            yield from self._stream(size, rows)

    def _stream(self, size: int, rows: torch.Tensor | None) -> Iterator[Batch]:
        if rows is None:
            yield from self._iterable
            return
        wanted = torch.as_tensor(rows)
        if len(wanted) > 1 and bool((wanted[1:] <= wanted[:-1]).any()):
            raise MsifError(
                f"Rows of {self.what} read in order (an iterable without random access) must be asked for in "
                "increasing order, without repeats.",
                "Sort the indices, or pass a map-style Dataset (len and [i]) instead.",
            )
        start, pending = 0, []
        for b in self._iterable:
            k = batch_size(b)
            inside = wanted[(wanted >= start) & (wanted < start + k)] - start
            if len(inside):
                pending.append(take(b, inside))
            start += k
            while pending and sum(batch_size(p) for p in pending) >= size:
                whole = concat(pending)
                yield take(whole, slice(0, size))
                rest = batch_size(whole) - size
                pending = [take(whole, slice(size, None))] if rest else []
        if pending:
            yield concat(pending)

    def first(self, size: int = 1) -> Batch:
        """A batch of the first examples (for the checks before any work)."""
        for b in self.batches(size):
            return take(b, slice(0, size))
        raise MsifError(f"The {self.what} are empty.", "Pass at least one example.")


__all__ = ["Batch", "Examples", "batch_size", "concat", "leaves", "per_example", "take", "to_device"]
