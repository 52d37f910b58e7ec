"""Moved: the client routines' types are in :mod:`cmfl_flower.client.task`.

Importing this module fails with the new path, so that a plug-in written against the old one
is told where to look.
"""

raise ImportError(
    "cmfl_flower.workspace moved to cmfl_flower.client.task: import ClientTask, ClientState, "
    "RoundOutput, Arrays and Metrics from there (the round's Workspace is "
    "cmfl_flower.client.workspace)"
)
