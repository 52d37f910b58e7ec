"""Flower ClientApp: unpack the message, run the named client task, reply.

Per-client state (vision LoRA, class tokens) lives in ``context.state``: in a deployment every
message starts a fresh process, so nothing else survives between rounds.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cmfl_flower.client import ClientState, parse_task, run_task
from cmfl_flower.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, TASK_KEY
from cmfl_flower.strategies.base import from_record, to_record

app = ClientApp()

STATE_KEYS = {"lora": "cmfl.encoder-lora", "tokens": "cmfl.class-tokens"}


def _load_state(context: Context) -> ClientState:
    records = context.state.array_records
    loaded = {
        field: records[key].to_torch_state_dict()
        for field, key in STATE_KEYS.items()
        if key in records
    }
    return ClientState(**loaded)


def _save_state(context: Context, state: ClientState) -> None:
    for field, key in STATE_KEYS.items():
        value = getattr(state, field)
        if value is not None:
            context.state.array_records[key] = ArrayRecord(value)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: the server names the task; the whole run config travels with it."""
    content = msg.content
    cfg, task = parse_task(context.node_config, content.config_records[CONFIG_KEY])
    record = content.array_records.get(ARRAYS_KEY)
    received = from_record(record) if record is not None else {}
    name = str(content.config_records[TASK_KEY]["name"])
    output = run_task(name, cfg, task, _load_state(context), received)
    _save_state(context, output.state)
    reply = RecordDict({METRICS_KEY: MetricRecord(output.metrics)})
    if output.arrays:
        reply[ARRAYS_KEY] = to_record(output.arrays)
    return Message(reply, reply_to=msg)
