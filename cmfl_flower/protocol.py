"""Names of the records in the messages between server and clients (shared by both sides)."""

CONFIG_KEY = "config"  # ConfigRecord: the flat run config plus ROUND_KEY
ROUND_KEY = "server-round"
TASK_KEY = "task"  # ConfigRecord: {"name": <client task>}
METRICS_KEY = "metrics"  # MetricRecord: the client's scalar metrics for the round
