"""Answering, for a new prompt, what is reusable and why a prefix broke."""

from kvforge.match.matcher import Matcher, SyncMatcher
from kvforge.match.report import (
    BlockKind,
    BlockMatch,
    Divergence,
    IndexResult,
    MatchReport,
    PrefixHash,
)

__all__ = [
    "BlockKind",
    "BlockMatch",
    "Divergence",
    "IndexResult",
    "MatchReport",
    "Matcher",
    "PrefixHash",
    "SyncMatcher",
]
