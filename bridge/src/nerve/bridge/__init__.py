"""nerve.bridge."""
