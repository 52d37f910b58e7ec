"""Flower ClientApp: unpack the message, run the named client task, reply.

Per-client state (vision LoRA, class tokens) lives in ``context.state``: in a deployment every
message starts a fresh process, so nothing else survives between rounds. The state after each
of the last two rounds is kept, and round ``r`` always starts from the newest state of a round
before ``r``: a round the server repeats after a resume starts where it first started.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cmfl_flower.client import ClientState, parse_task, run_task
from cmfl_flower.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, TASK_KEY
from cmfl_flower.strategies.base import from_record, to_record

app = ClientApp()

STATE_FIELDS = ("lora", "tokens")
KEEP_ROUNDS = 2


def _state_key(server_round: int, field: str) -> str:
    return f"cmfl.r{server_round}.{field}"


def _saved_rounds(context: Context) -> list[int]:
    return sorted({int(key.split(".")[1][1:]) for key in context.state.array_records})


def _load_state(context: Context, server_round: int) -> ClientState:
    """The state after the newest saved round before ``server_round``."""
    earlier = [r for r in _saved_rounds(context) if r < server_round]
    if not earlier:
        return ClientState()
    records = context.state.array_records
    keys = {field: _state_key(earlier[-1], field) for field in STATE_FIELDS}
    return ClientState(
        **{f: records[k].to_torch_state_dict() for f, k in keys.items() if k in records}
    )


def _save_state(context: Context, state: ClientState, server_round: int) -> None:
    records = context.state.array_records
    for field in STATE_FIELDS:
        value = getattr(state, field)
        if value is not None:
            records[_state_key(server_round, field)] = ArrayRecord(value)
    for old in _saved_rounds(context)[:-KEEP_ROUNDS]:
        for field in STATE_FIELDS:
            records.pop(_state_key(old, field), None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: the server names the task; the whole run config travels with it."""
    content = msg.content
    cfg, task = parse_task(context.node_config, content.config_records[CONFIG_KEY])
    record = content.array_records.get(ARRAYS_KEY)
    received = from_record(record) if record is not None else {}
    name = str(content.config_records[TASK_KEY]["name"])
    state = _load_state(context, task.server_round)
    output = run_task(name, cfg, task, state, received)
    _save_state(context, output.state, task.server_round)
    reply = RecordDict({METRICS_KEY: MetricRecord(output.metrics)})
    if output.arrays:
        reply[ARRAYS_KEY] = to_record(output.arrays)
    return Message(reply, reply_to=msg)
