"""Flower ClientApp: unpack the message, run the named client task, reply.

Per-client state (vision LoRA, class tokens) is kept on the node's disk by
:mod:`cmfl_flower.client_state`, keyed by the cmfl run name and partition id: it survives
between messages (in a deployment every message starts a fresh process) and across a restarted
run (``output.resume``), whose ``context.state`` starts empty.
"""

from logging import ERROR

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from cmfl_flower.client import parse_task, run_task
from cmfl_flower.client_state import load_state, save_state, state_dir
from cmfl_flower.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, TASK_KEY
from cmfl_flower.strategies.base import from_record, to_record

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round; a user mistake (``ValueError``) becomes a one-line error reply, no traceback."""
    try:
        return _train(msg, context)
    except ValueError as err:
        log(ERROR, "cmfl-flower client, node %d: %s", context.node_id, err)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    """One round: the server names the task; the whole run config travels with it."""
    content = msg.content
    cfg, task = parse_task(context.node_config, content.config_records[CONFIG_KEY])
    record = content.array_records.get(ARRAYS_KEY)
    received = from_record(record) if record is not None else {}
    name = str(content.config_records[TASK_KEY]["name"])
    directory = state_dir(cfg, task.partition_id)
    state = load_state(directory, task.server_round)
    output = run_task(name, cfg, task, state, received)
    save_state(directory, output.state, task.server_round)
    reply = RecordDict({METRICS_KEY: MetricRecord(output.metrics)})
    if output.arrays:
        reply[ARRAYS_KEY] = to_record(output.arrays)
    return Message(reply, reply_to=msg)
