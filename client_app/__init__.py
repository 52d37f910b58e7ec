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
(``output.resume``), whose ``context.state`` starts empty. A node whose config sets
``worker-idle-seconds`` hands its rounds to a long-lived worker that keeps the models loaded
(:mod:`cmfl_flower.client.worker`); so this module imports no model library itself.
"""

from functools import partial
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from cmfl_flower.client.task import client_task
from cmfl_flower.client.worker import Kind, Request, run
from cmfl_flower.config import AppConfig
from cmfl_flower.methods import BUILT_IN, action
from cmfl_flower.methods.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ROUND_KEY,
    RUN_NAME_KEY,
    from_record,
    reply,
)

app = ClientApp()


def _read(kind: Kind, method: str, msg: Message, context: Context) -> Request:
    """The round a message asks for: run config, who and which round, the arrays sent."""
    config = {
        k: v
        for k, v in msg.content.config_records.get(CONFIG_KEY, {}).items()
        if isinstance(v, (int, float, str, bool))
    }
    run_name = str(config.pop(RUN_NAME_KEY, ""))
    cfg = AppConfig.from_run_config({**context.run_config, "output.run-name": run_name})
    task = client_task(context.node_config, config.pop(ROUND_KEY, None), config)
    record = msg.content.array_records.get(ARRAYS_KEY)
    received = from_record(record) if record is not None else {}
    return Request(kind, method, cfg, task, context.node_id, context.node_config, received)


def _handle(kind: Kind, name: str | None, msg: Message, context: Context) -> Message:
    """One round of the method; a user mistake (``ValueError``) becomes a one-line error reply.

    ``train`` keeps the client's state on the node's disk; ``evaluate`` scores the arrays sent.
    """
    try:
        request = _read(kind, name or str(context.run_config.get("method", "")), msg, context)
        return reply(run(request), msg, request.task.server_round)
    except ValueError as err:
        log(ERROR, "cmfl-flower client, node %d: %s", context.node_id, err)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)


for _name in BUILT_IN:
    app.train(action(_name))(partial(_handle, "train", _name))
    app.evaluate(action(_name))(partial(_handle, "evaluate", _name))
app.train()(partial(_handle, "train", None))  # the run config's method (plug-ins)
app.evaluate()(partial(_handle, "evaluate", None))
