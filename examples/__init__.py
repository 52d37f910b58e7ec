"""Runnable examples: a plug-in method and a custom Flower strategy, each named by import path.

They travel with the app bundle, so ``flwr run`` finds them on every SuperNode.
"""
