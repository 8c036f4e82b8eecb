"""Throwaway PostgreSQL clusters (tests, benchmarks, the embedded demo); see ``cluster``."""

from .cluster import (
    Cluster,
    ClusterError,
    ServerBinaries,
    default_server,
    find_server_binaries,
)

__all__ = [
    "Cluster",
    "ClusterError",
    "ServerBinaries",
    "default_server",
    "find_server_binaries",
]
