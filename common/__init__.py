"""Shared types and adapters: job schema, config, errors, logging, brokers, storage.

Imports nothing else from the project (see docs/architecture.md).
"""
