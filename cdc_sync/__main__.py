"""`python -m cdc_sync` is `cdc-sync`.

The cyclic garbage collector is off while the CLI's modules are imported (they allocate tens
of thousands of long-lived objects and almost no garbage: a collection pass would only walk
them); `cli.main`, run as the process's own entry point, then moves them out of its sight.
"""

import gc

gc.disable()
try:
    from .cli import main
finally:
    gc.enable()

main()
