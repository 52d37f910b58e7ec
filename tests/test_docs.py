"""The README and the docs site agree: the home page is the README, every README link resolves.

``docs/index.md`` is the README with its links made relative to ``docs/``; after editing the
README, ``python -m tests.test_docs`` writes it again.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SITE_NOTE = (
    "These pages are built from `docs/` with mkdocs: `mkdocs serve` shows them at\n"
    "http://127.0.0.1:8000, `mkdocs build --strict` builds them (CI does). Newcomers start at\n"
    "[where things live](layout.md).\n"
)


def home_page(readme: str) -> str:
    """The docs site's home page made from the README's text."""
    text = readme.replace("](docs/", "](")
    start = text.index("The pages under [`docs/`]")
    end = text.index("## Development")
    text = text[:start] + SITE_NOTE + "\n" + text[end:]
    return text.replace("([LICENSE](LICENSE))", "(the `LICENSE` file of the repository)")


def test_the_home_page_is_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "index.md").read_text() == home_page(readme), (
        "docs/index.md is out of date: run python -m tests.test_docs"
    )


def test_every_relative_link_of_the_readme_resolves():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in LINK.findall(readme) if not t.startswith(("http", "#", "mailto:"))]
    assert targets, "the README links to the docs"
    for target in targets:
        assert (ROOT / target.split("#")[0]).exists(), target


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


if __name__ == "__main__":
    (ROOT / "docs" / "index.md").write_text(home_page((ROOT / "README.md").read_text()))
