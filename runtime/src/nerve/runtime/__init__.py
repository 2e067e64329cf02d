"""nerve.runtime."""
