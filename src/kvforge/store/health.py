"""What every backend (index or residency, in memory or on Redis) says about its link."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """``available``: the shared store answered its last call (always true in memory);
    ``failures`` / ``recoveries``: calls that failed open, and returns to service;
    ``degraded``: queries answered "nothing held" because the store was away; ``counters``:
    the backend's own counters (resyncs, appended batches, …)."""

    available: bool = True
    failures: int = 0
    recoveries: int = 0
    degraded: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self, degraded_name: str = "degraded") -> dict[str, Any]:
        """The JSON form of ``/v1/stats`` (the degraded counter under its backend's name)."""
        return {
            "available": self.available,
            "failures": self.failures,
            "recoveries": self.recoveries,
            degraded_name: self.degraded,
            **self.counters,
        }
