"""A plain, obviously-correct model of what the index must answer (for property tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvforge.blocks import BlockHasher
from kvforge.index import is_excluded


@dataclass
class RefIndex:
    hasher: BlockHasher
    owners: dict[tuple[str, str], tuple[list[bytes], list[tuple[int, ...]]]] = field(
        default_factory=dict
    )

    def blocks(
        self, tokens: list[int], salt: str | None = None
    ) -> tuple[list[bytes], list[tuple[int, ...]]]:
        bs = self.hasher.block_size
        chain = self.hasher.chain(tokens, cache_salt=salt)
        return chain, [tuple(tokens[i * bs : (i + 1) * bs]) for i in range(len(chain))]

    def put(self, tenant: str, owner: str, tokens: list[int], salt: str | None = None) -> None:
        self.owners[(tenant, owner)] = self.blocks(tokens, salt)

    def remove(self, tenant: str, owner: str) -> int:
        got = self.owners.pop((tenant, owner), None)
        return len(got[0]) if got else 0

    def expect(
        self,
        tenant: str,
        tokens: list[int],
        salt: str | None = None,
        exclude: str | None = None,
        near_radius: int = 0,
    ) -> tuple[dict[str, int], list[tuple[str, frozenset[str]]]]:
        chain, toks = self.blocks(tokens, salt)
        depth: dict[str, int] = {}
        for (t, o), (c, _) in self.owners.items():
            if t != tenant or is_excluded(o, exclude):
                continue
            d = 0
            while d < min(len(c), len(chain)) and c[d] == chain[d]:
                d += 1
            if d:
                depth[o] = d
        exact = max(depth.values(), default=0)
        kinds: list[tuple[str, frozenset[str]]] = []
        for i in range(len(chain)):
            if i < exact:
                kinds.append(("exact", frozenset(o for o, d in depth.items() if d > i)))
                continue
            holders = frozenset(
                o
                for (t, o), (_, bt) in self.owners.items()
                if t == tenant and not is_excluded(o, exclude) and toks[i] in bt
            )
            if holders:
                kinds.append(("moved", holders))
                continue
            # near: the owners of the closest blocks within the radius (distance in the kind)
            best, near = near_radius + 1, set()
            for (t, o), (_, bt) in self.owners.items():
                if t != tenant or is_excluded(o, exclude):
                    continue
                for blk in bt:
                    d = sum(a != b for a, b in zip(blk, toks[i], strict=True))
                    if not 0 < d <= near_radius:
                        continue
                    if d < best:
                        best, near = d, {o}
                    elif d == best:
                        near.add(o)
            kinds.append((f"near{best}", frozenset(near)) if near else ("none", frozenset()))
        return depth, kinds
