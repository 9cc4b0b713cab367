"""Routing requests to the engine replica that holds their prefix, from the engines' KV events."""

from kvforge.route.residency import PrefixScore, Residency, ResidencyIndex
from kvforge.route.router import EngineConfig, RouteDecision, Router

__all__ = ["EngineConfig", "PrefixScore", "Residency", "ResidencyIndex", "RouteDecision", "Router"]
