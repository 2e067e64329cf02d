"""nerve.edge."""
