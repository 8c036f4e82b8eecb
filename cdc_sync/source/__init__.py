"""The source side: the replication stream, the source catalog, slot, publication, snapshot."""
