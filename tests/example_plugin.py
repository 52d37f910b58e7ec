"""The example plug-in moved: ``method = "examples.best_peer:BEST_PEER"``."""

raise ImportError(
    "tests.example_plugin moved to examples.best_peer: use method = 'examples.best_peer:BEST_PEER'"
)
