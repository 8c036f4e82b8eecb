import time, logging
from cdc_sync import commands
from .helpers import *

def test_proto(env):
    logging.basicConfig(level=logging.INFO)
    execute(env.source, "create table t (id int primary key, v text)",
            "insert into t select g, 'x' from generate_series(1,100) g")
    s = env.settings()
    commands.init(s)
    with running_pipeline(s) as p:
        t1 = time.monotonic()
        for i in range(10):
            execute(env.source, f"update t set v = 'y{i}' where id = {i+1}")
        tgt = current_lsn(env.source)
        for _ in range(60):
            print(f"{time.monotonic()-t1:.2f}", tgt, [str(w.durable_lsn) for w in p.workers], current_lsn(env.source), table_fingerprint(env.sites[0], 't') == table_fingerprint(env.source, 't'))
            time.sleep(0.5)
