"""The fleet load tool: simulated devices through the real MQTT path (`nerve simulate`, docs/fleet.md)."""

from nerve.runtime.fleet.simulate import FleetPlan, Second, Simulation, Summary, percentile

__all__ = ["FleetPlan", "Second", "Simulation", "Summary", "percentile"]
