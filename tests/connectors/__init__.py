"""Outbound connectors: webhook client and runner."""
