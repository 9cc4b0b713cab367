"""Cluster simulation: vLLM-like engines, routing policies, synthetic multi-agent workloads."""

from kvforge.sim.cluster import POLICIES, ClusterConfig, PolicyResult, SimRequest, simulate
from kvforge.sim.engine import SimEngine
from kvforge.sim.workload import multi_agent_trace

__all__ = [
    "POLICIES",
    "ClusterConfig",
    "PolicyResult",
    "SimEngine",
    "SimRequest",
    "multi_agent_trace",
    "simulate",
]
