"""Appliers: site databases, the outbound connector table, and the cdc_sync schema in each site."""
