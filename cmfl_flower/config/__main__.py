"""``python -m cmfl_flower.config``: print the run config's TOML defaults or its reference."""

from __future__ import annotations

import argparse

from cmfl_flower.config import render_markdown, render_toml


def main(argv: list[str] | None = None) -> None:
    """Print the TOML defaults or the Markdown reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toml", action="store_true", help="print [tool.flwr.app.config]")
    parser.add_argument("--markdown", action="store_true", help="print the docs' table")
    args = parser.parse_args(argv)
    print(render_markdown() if args.markdown else render_toml())


if __name__ == "__main__":
    main()
