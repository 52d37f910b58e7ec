"""Tools that make the project's own weights and architectures, outside the runtime package.

:mod:`.train_tiny` trains the ``tiny`` backbone and :mod:`.train_fewshot` the weak
``tiny-fewshot`` CLIP (their weights ship in ``cmfl_flower/zoo/``, which the runtime reads);
:mod:`.builders` assembles and saves them; :mod:`.archs` holds the full-size architectures as
data, built with random weights by the benchmarks and tests. Neither app imports any of it.
"""
