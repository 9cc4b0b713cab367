"""Trace analysis: what prefix caching reuses across a pipeline's agents, and what it misses."""

from kvforge.analyze.trace import TraceAnalysis, TraceRequest, analyze, iter_trace, read_trace

__all__ = ["TraceAnalysis", "TraceRequest", "analyze", "iter_trace", "read_trace"]
