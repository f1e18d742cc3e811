"""The torch runtime's KV cache of the running batch: one row per sequence, left-padded to a common length.

Column ``j`` of the cache is the same slot for every row, so the causal mask stays a plain
causal mask over columns; the 2-D ``mask`` says which columns of a row hold real tokens.
Rows are added (merged on the left-padding side), repeated (n alternatives share one
prefill) and dropped (finished or cancelled) between decode steps.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class RowCache:
    """A :class:`DynamicCache` plus its ``[rows, columns]`` 0/1 attention mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask
        self.clear_padding()

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def clear_padding(self) -> None:
        """Zero the keys and values of padding columns.

        A padded query attends to nothing during prefill and may leave NaN there; masked
        scores only stay harmless if the keys and values behind them are finite.
        """
        padding = (self.mask == 0)[:, None, :, None]
        if padding.any():
            for keys, values in self.layers():
                keys.masked_fill_(padding, 0.0)
                values.masked_fill_(padding, 0.0)

    def extend_mask(self) -> torch.Tensor:
        """The mask for the next decode step: one more real column for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def select(self, rows: list[int]) -> None:
        """Keep ``rows`` (in that order, repeats allowed), then drop all-padding leading columns."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self._trim_left()

    def merge(self, other: "RowCache") -> None:
        """Append ``other``'s rows below ours, left-padding whichever is shorter."""
        columns = max(self.columns, other.columns)
        merged = []
        for (keys, values), (other_keys, other_values) in zip(self.layers(), other.layers()):
            merged.append(
                (
                    torch.cat([_pad_left(keys, columns), _pad_left(other_keys, columns)], dim=0),
                    torch.cat([_pad_left(values, columns), _pad_left(other_values, columns)], dim=0),
                )
            )
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.mask = torch.cat([_pad_mask_left(self.mask, columns), _pad_mask_left(other.mask, columns)], dim=0)

    def _trim_left(self) -> None:
        if self.rows == 0:
            return
        real_columns = self.mask.any(dim=0).nonzero()
        drop = int(real_columns[0]) if len(real_columns) else self.columns
        if drop == 0:
            return
        self.mask = self.mask[:, drop:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, drop:, :]
            layer.values = layer.values[:, :, drop:, :]


def _pad_left(states: torch.Tensor, columns: int) -> torch.Tensor:
    missing = columns - states.shape[2]
    if missing == 0:
        return states
    padding = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([padding, states], dim=2)


def _pad_mask_left(mask: torch.Tensor, columns: int) -> torch.Tensor:
    missing = columns - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
