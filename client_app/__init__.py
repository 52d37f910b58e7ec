"""Flower ClientApp: unpack the message, run the named client task, reply with metrics.

Per-client state (the vision LoRA) lives in ``context.state``: in a deployment every message
starts a fresh process, so nothing else survives between rounds.
"""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cmfl_flower.client import ClientState, parse_task, run_task
from cmfl_flower.protocol import CONFIG_KEY, METRICS_KEY, TASK_KEY

app = ClientApp()

LORA_STATE_KEY = "cmfl.encoder-lora"


def _load_state(context: Context) -> ClientState:
    record = context.state.array_records.get(LORA_STATE_KEY)
    return ClientState(lora=record.to_torch_state_dict() if record is not None else None)


def _save_state(context: Context, state: ClientState) -> None:
    if state.lora is not None:
        context.state.array_records[LORA_STATE_KEY] = ArrayRecord(state.lora)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: the server names the task; the whole run config travels with it."""
    cfg, task = parse_task(context.node_config, msg.content.config_records[CONFIG_KEY])
    name = str(msg.content.config_records[TASK_KEY]["name"])
    output = run_task(name, cfg, task, _load_state(context))
    _save_state(context, output.state)
    return Message(RecordDict({METRICS_KEY: MetricRecord(output.metrics)}), reply_to=msg)
