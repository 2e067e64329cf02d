"""nerve.agents."""
