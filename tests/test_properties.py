"""The index against a plain reference model: stateful property test and threaded stress."""

from __future__ import annotations

import os
import random
import threading

import pytest
from conftest import redis_index_url
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from reference import RefIndex

from kvforge import SyncMatcher

BS = 4
AGENTS = ["a", "b", "c", "a:system", "b:tools"]
TENANTS = ["t1", "t2"]
# tiny vocabulary and shared pieces, so prompts share prefixes and content at other positions
PIECES = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], [2, 3, 4, 5], [7]]
prompts = st.lists(st.sampled_from(range(len(PIECES))), max_size=7).map(
    lambda idx: [t for i in idx for t in PIECES[i]]
)
salts = st.sampled_from([None, None, "s1"])


def _check(m: SyncMatcher, ref: RefIndex, tenant: str, tokens: list[int], salt, exclude) -> None:
    r = m.find_reusable_blocks(tokens, tenant=tenant, cache_salt=salt, exclude_agent=exclude)
    depth, kinds = ref.expect(tenant, tokens, salt, exclude, m.near_radius)
    assert r.prefix_blocks_by_owner == depth
    got = [b.kind + (str(b.distance) if b.kind == "near" else "") for b in r.blocks]
    assert got == [k for k, _ in kinds]
    for b, (_, holders) in zip(r.blocks, kinds, strict=True):
        if b.kind == "near":  # the owners of one closest block: among the closest holders
            assert b.owners and frozenset(b.owners) <= holders
            continue
        assert frozenset(b.owners) == holders
        # a source really holds these tokens at that position
        for owner, pos in b.sources:
            toks = m.index.owner_block_tokens(tenant, owner, pos)
            assert toks is not None and toks.tolist() == tokens[b.start : b.start + BS]


class IndexMachine(RuleBasedStateMachine):
    """In memory: one matcher against the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.m = self.replicas = None
        self.setup()
        assert self.m is not None
        self.ref = RefIndex(self.m.hasher)

    def setup(self) -> None:
        self.m = SyncMatcher(block_size=BS)
        self.replicas = [self.m]

    @rule(replica=st.integers(0, 2))
    def switch(self, replica: int) -> None:
        """Later steps run on another replica (only the Redis machine has several)."""
        self.m = self.replicas[replica % len(self.replicas)]

    @rule(
        tenant=st.sampled_from(TENANTS), agent=st.sampled_from(AGENTS), tokens=prompts, salt=salts
    )
    def index(self, tenant: str, agent: str, tokens: list[int], salt) -> None:
        depth, _ = self.ref.expect(tenant, tokens, salt, None, 0)
        shared = max((d for o, d in depth.items() if o != agent), default=0)
        r = self.m.index_prompt(agent, tokens, tenant=tenant, cache_salt=salt)
        self.ref.put(tenant, agent, tokens, salt)
        assert r.num_blocks == len(tokens) // BS
        # shared: the prefix other owners already held; new: the rest
        assert (r.shared_blocks, r.new_blocks) == (shared, r.num_blocks - shared)

    @rule(tenant=st.sampled_from(TENANTS), agent=st.sampled_from(AGENTS))
    def clear(self, tenant: str, agent: str) -> None:
        assert self.m.clear_agent(agent, tenant=tenant) == self.ref.remove(tenant, agent)

    @rule(
        tenant=st.sampled_from(TENANTS),
        tokens=prompts,
        salt=salts,
        exclude=st.sampled_from([None, "a", "b", "c"]),
    )
    def query(self, tenant: str, tokens: list[int], salt, exclude) -> None:
        _check(self.m, self.ref, tenant, tokens, salt, exclude)

    @invariant()
    def counts(self) -> None:
        s = self.m.stats()
        assert s["agents"] == len(self.ref.owners)
        assert s["owner_blocks"] == sum(len(c) for c, _ in self.ref.owners.values())
        distinct = {(t, h) for (t, _), (c, _) in self.ref.owners.items() for h in c}
        assert s["blocks"] == len(distinct)


class RedisIndexMachine(IndexMachine):
    """On Redis: three replicas (three processes' worth of state) share one index; every step
    may run on any of them, and each must agree with the reference at every step."""

    def setup(self) -> None:
        url = redis_index_url(os.environ["KVFORGE_TEST_REDIS_URL"])
        self.replicas = [SyncMatcher(block_size=BS, index=url) for _ in range(3)]
        self.m = self.replicas[0]


IndexMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestIndexMachine = IndexMachine.TestCase
RedisIndexMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None
)


@pytest.mark.usefixtures("redis_server")
class TestRedisIndexMachine(RedisIndexMachine.TestCase):  # type: ignore[name-defined]
    pass


def test_threaded_stress_matches_reference(index_url) -> None:
    """Many threads index, clear and query at once: no exception, and the final state equals
    the reference model replaying each thread's last word per agent. On Redis, the threads
    are spread over two replicas and the final state is checked on both."""
    url = index_url()
    replicas = [SyncMatcher(block_size=BS, index=url) for _ in range(1 if "memory" in url else 2)]
    m = replicas[0]
    errors: list[BaseException] = []
    final: dict[str, list[int] | None] = {}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        m = replicas[seed % len(replicas)]
        rnd = random.Random(seed)
        agent = f"agent{seed}"
        try:
            for _ in range(150):
                op = rnd.random()
                toks = [
                    t
                    for i in rnd.choices(range(len(PIECES)), k=rnd.randint(0, 8))
                    for t in PIECES[i]
                ]
                if op < 0.45:
                    m.index_prompt(agent, toks)
                    with lock:
                        final[agent] = toks
                elif op < 0.6:
                    m.clear_agent(agent)
                    with lock:
                        final[agent] = None
                else:
                    r = m.find_reusable_blocks(toks)
                    assert all(d <= r.num_blocks for d in r.prefix_blocks_by_owner.values())
                    m.get_shared_prefix_hash(toks)
                    m.stats()
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    ref = RefIndex(m.hasher)
    for agent, toks in final.items():
        if toks is not None:
            ref.put("default", agent, toks)
    for m in replicas:
        for toks in ([1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 1, 2, 3, 4], [2, 3, 4, 5, 5, 6, 7, 8]):
            depth, kinds = ref.expect("default", toks, near_radius=m.near_radius)
            r = m.find_reusable_blocks(toks)
            assert r.prefix_blocks_by_owner == depth
            got = [b.kind + (str(b.distance) if b.kind == "near" else "") for b in r.blocks]
            assert got == [k for k, _ in kinds]
        assert m.stats()["agents"] == len(ref.owners)
