"""The batch sizes a batchserve server ran during a benchmark, read from its ``/metrics``.

The server exports ``batchserve_batch_size`` (a histogram per model); the difference
between a scrape before and one after the run is the run's own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILY = "batchserve_batch_size"


@dataclass
class BatchSizes:
    """One model's batch-size histogram: cumulative counts by upper bound, and the item total."""

    cumulative: dict[float, float] = field(default_factory=dict)  # le -> batches with size <= le
    items: float = 0.0

    @property
    def batches(self) -> float:
        return self.cumulative.get(float("inf"), 0.0)

    def minus(self, earlier: "BatchSizes") -> "BatchSizes":
        cumulative = {le: count - earlier.cumulative.get(le, 0.0) for le, count in self.cumulative.items()}
        return BatchSizes(cumulative, self.items - earlier.items)

    def distribution(self) -> dict[str, int]:
        """Batches per size range, e.g. ``{"1": 3, "2": 0, "3-4": 7, ...}``, empty ranges kept."""
        ranges: dict[str, int] = {}
        previous_bound, previous_count = 0.0, 0.0
        for bound in sorted(self.cumulative):
            count = self.cumulative[bound]
            ranges[_range_label(previous_bound, bound)] = int(round(count - previous_count))
            previous_bound, previous_count = bound, count
        return ranges

    def describe(self) -> dict:
        batches = int(round(self.batches))
        return {
            "batches": batches,
            "items": int(round(self.items)),
            "mean": self.items / batches if batches else 0.0,
            "distribution": self.distribution(),
        }


def parse_batch_sizes(text: str) -> dict[str, BatchSizes]:
    """Every model's batch-size histogram in a Prometheus text exposition."""
    models: dict[str, BatchSizes] = {}
    for family in text_string_to_metric_families(text):
        if family.name != FAMILY:
            continue
        for sample in family.samples:
            sizes = models.setdefault(sample.labels.get("model", ""), BatchSizes())
            if sample.name.endswith("_bucket"):
                sizes.cumulative[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                sizes.items = sample.value
    return models


async def scrape_batch_sizes(client: httpx.AsyncClient, base_url: str) -> dict[str, BatchSizes] | None:
    """The target's batch-size histograms, or None when it is not a batchserve server."""
    try:
        response = await client.get(f"{base_url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    models = parse_batch_sizes(response.text)
    return models or None


def batch_sizes_during(
    before: dict[str, BatchSizes] | None, after: dict[str, BatchSizes] | None
) -> dict[str, dict] | None:
    """Per model that ran batches between two scrapes: count, items, mean and distribution."""
    if before is None or after is None:
        return None
    during = {}
    for model, sizes in after.items():
        difference = sizes.minus(before.get(model, BatchSizes()))
        if difference.batches > 0:
            during[model] = difference.describe()
    return during


def _range_label(previous_bound: float, bound: float) -> str:
    low = int(previous_bound) + 1
    if bound == float("inf"):
        return f">{int(previous_bound)}"
    high = int(bound)
    return str(high) if low >= high else f"{low}-{high}"
