"""The client side, free of Flower: what a client routine receives, works with and keeps.

:mod:`.task` holds the contract between the ClientApp and every routine (``ClientTask``,
``ClientState``, ``RoundOutput``) and imports no model library; :mod:`.workspace` loads what a
round works with (its data, the process-wide encoder, the text side) and scores it;
:mod:`.store` keeps a client's state on its node's disk between messages.
"""
