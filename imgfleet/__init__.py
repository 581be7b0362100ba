"""The imgfleet composition root: the CLI that wires configuration to concrete adapters."""

__version__ = "0.3.0"
