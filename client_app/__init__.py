"""Flower ClientApp: one handler per message type, each reading the message and calling a routine.

A message of type ``train.<action>`` runs the built-in method of that action (``train.cmfl_relay``
runs ``cmfl-relay``'s client routine); a plain ``train`` (or ``evaluate``) message runs the
method the run config names, which is how a plug-in's routine is found. The run config comes
from ``context.run_config``; the message brings only the round, the resolved run name, what
the strategy adds (e.g. ``proximal-mu``) and the arrays. Every reply (:func:`reply`, for
every method, plug-ins included) names the round it answers in its metrics (``server-round``).

Per-client state (vision LoRA, class tokens) is kept on the node's disk by
:mod:`cmfl_flower.client.store`, keyed by the run name and partition id: it survives between
messages (in a deployment every message starts a fresh process) and across a restarted run
(``output.resume``), whose ``context.state`` starts empty.
"""

from collections.abc import Callable
from functools import partial
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from cmfl_flower.aliases import Arrays
from cmfl_flower.client.store import train_with_state
from cmfl_flower.client.task import ClientTask, RoundOutput, client_task
from cmfl_flower.config import AppConfig
from cmfl_flower.methods import BUILT_IN, Method, action, resolve_method
from cmfl_flower.methods.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ROUND_KEY,
    RUN_NAME_KEY,
    from_record,
    reply,
)
from cmfl_flower.threads import pin_threads

app = ClientApp()
Handler = Callable[[Method, Message, Context], Message]


def _read(msg: Message, context: Context) -> tuple[AppConfig, ClientTask, Arrays]:
    """The run config, who and which round, and the arrays the server sent."""
    config = {
        k: v
        for k, v in msg.content.config_records.get(CONFIG_KEY, {}).items()
        if isinstance(v, (int, float, str, bool))
    }
    run_name = str(config.pop(RUN_NAME_KEY, ""))
    cfg = AppConfig.from_run_config({**context.run_config, "output.run-name": run_name})
    pin_threads(cfg.backbone.threads, context.node_config)  # before any work, every message
    task = client_task(context.node_config, config.pop(ROUND_KEY, None), config)
    record = msg.content.array_records.get(ARRAYS_KEY)
    return cfg, task, from_record(record) if record is not None else {}


def _train(method: Method, msg: Message, context: Context) -> Message:
    """One round of ``method``'s client routine, its state kept on the node's disk."""
    cfg, task, received = _read(msg, context)
    output = train_with_state(method.train, cfg, task, context.node_id, received)
    return reply(output, msg, task.server_round)


def _evaluate(method: Method, msg: Message, context: Context) -> Message:
    """Flower's ``evaluate``: ``method`` scores the arrays it was sent."""
    if method.evaluate is None:
        raise ValueError(
            f"method {method.name!r} does not answer evaluate messages: "
            "set federation.fraction-evaluate = 0"
        )
    cfg, task, received = _read(msg, context)
    return reply(RoundOutput(method.evaluate(cfg, task, received)), msg, task.server_round)


def _guarded(handler: Handler, name: str | None, msg: Message, context: Context) -> Message:
    """Run ``handler``; a user mistake (``ValueError``) becomes a one-line error reply."""
    try:
        method = resolve_method(name or str(context.run_config.get("method", "")))
        return handler(method, msg, context)
    except ValueError as err:
        log(ERROR, "cmfl-flower client, node %d: %s", context.node_id, err)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)


for _name in BUILT_IN:
    app.train(action(_name))(partial(_guarded, _train, _name))
    app.evaluate(action(_name))(partial(_guarded, _evaluate, _name))
app.train()(partial(_guarded, _train, None))  # the run config's method (plug-ins)
app.evaluate()(partial(_guarded, _evaluate, None))
