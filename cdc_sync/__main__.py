"""`python -m cdc_sync` is `cdc-sync`."""

from .cli import main

main()
