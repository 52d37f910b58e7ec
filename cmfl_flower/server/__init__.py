"""The server side: the round loop and everything of Flower it needs.

:mod:`.rounds` runs any method's strategy round by round (routing, byte counts, reply checks,
partition identities, summaries, checkpoints); :mod:`.strategies` builds Flower's own strategies
for the weight methods; :mod:`.flower_api` wraps every use of a Flower API that is not public.
The methods themselves live in :mod:`cmfl_flower.methods`.
"""
