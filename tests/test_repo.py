"""The README's set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("lora-cpt demo")
    assert "pytest" in block[1]
    ci_lines = [x.strip() for x in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert block[1] in ci_lines


# ---------------------------------------------------------------- the README stays a newcomer's document

README_MAX_BYTES = 25_000  # the short path, the command list and the recipe keys; internals live in docs/
SHORT_PATH = ["prepare", "plan", "train", "eval", "merge", "export"]


def _code(markdown: str) -> tuple[list[str], list[str]]:
    """(fenced code blocks, inline code spans) of a Markdown text."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    return fenced, re.findall(r"`([^`]+)`", prose)


def _command_lines(fenced: list[str]) -> list[str]:
    """Shell lines of fenced blocks, continuations joined and comments dropped."""
    lines = []
    for block in fenced:
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"\s+#.*$", "", line).strip())
    return lines


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_opens_with_the_short_path_on_ones_own_data():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    size = len(readme.encode("utf-8"))
    assert size < README_MAX_BYTES, f"README.md is {size:,} bytes: move internals to docs/ and link them"
    after_setup = readme.split("```bash\n", 1)[1].split("```", 1)[1]
    first = after_setup.split("\n## ", 1)[1].split("\n## ", 1)[0]  # the first section after the two commands
    invoked = [line.split()[1] for line in _command_lines(_code(first)[0]) if line.startswith("lora-cpt ")]
    assert list(dict.fromkeys(invoked)) == SHORT_PATH, invoked  # each step shown, in the order one runs them
    assert "hf auth login" in first and "licence" in first  # gated models: accept the licence, then log in
    assert "rule of thumb" in first.lower() and "forgetting" in first.lower()  # how to read the general row


def test_every_command_and_option_the_readme_shows_exists():
    import typer

    from lora_cpt.cli import app

    commands = typer.main.get_command(app).commands
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    fenced, inline = _code(readme)
    shown = [line for line in _command_lines(fenced) if line.startswith("lora-cpt ")]
    shown += [" ".join(span.split()) for span in inline if span.startswith("lora-cpt ")]
    assert len(shown) >= len(SHORT_PATH)
    for line in shown:
        name = line.split()[1]
        if name in {"...", "COMMAND"}:
            continue
        assert name in commands, f"README shows `lora-cpt {name}`, which is not a command"
        known = {opt for p in commands[name].params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", line):
            assert option in known, f"README shows `{line}`: lora-cpt {name} has no option {option}"


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                prose = re.sub(r"^```[^\n]*\n.*?^```", "", linked.read_text(encoding="utf-8"), flags=re.S | re.M)
                anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
                assert anchor in anchors, f"{page.name} links to {target}: no such heading in {linked.name}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ["data", "plan", "training", "eval", "merge", "gguf", "internals", "reliability"]:
        assert f"](docs/{doc}.md" in readme, f"README does not link docs/{doc}.md"
