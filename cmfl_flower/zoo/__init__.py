"""The project's own model zoo: configs (and, once trained, weights) of the `tiny` backbone."""
