"""Names of the records in the messages between server and clients (shared by both sides).

Server -> client: ``config`` (the flat run config plus ``server-round``), ``task`` (the name
of the client routine), and, when the strategy sends arrays, ``arrays``. Client -> server:
``metrics`` (scalars) and, when the routine returns arrays, ``arrays``. What ``arrays`` holds
depends on the strategy (see the README's data-minimisation table and ``cmfl_flower.wire``).
"""

CONFIG_KEY = "config"  # ConfigRecord: the flat run config plus ROUND_KEY
ROUND_KEY = "server-round"
TASK_KEY = "task"  # ConfigRecord: {"name": <client task>}
ARRAYS_KEY = "arrays"  # ArrayRecord: token vectors or adapter weights, per strategy
METRICS_KEY = "metrics"  # MetricRecord: the client's scalar metrics for the round
