"""cdc_sync: PostgreSQL change-data-capture over pgoutput, applied to many sites exactly once."""

__version__ = "0.1.0"
