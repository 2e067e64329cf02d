"""The `nerve` command line: `main` parses, loads settings once, and dispatches to one command module."""

from nerve.runtime.cli.main import main

__all__ = ["main"]
