"""The README's "Supported versions" stays true: its table names the Makefile's legs, with the
versions the Makefile installs, and CI (``.ci/run``) runs exactly the legs the table marks.

Read from the files themselves (README.md, Makefile, .ci/run), so none can drift from the
others; nothing is installed or run.
"""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## ``."""
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def table_rows() -> list[dict[str, str]]:
    """The rows of the Supported versions table, as {column header: cell}."""
    lines = [x for x in section("Supported versions").splitlines() if x.startswith("|")]
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines]
    header, rows = cells[0], cells[2:]  # cells[1] is the |---| rule
    return [dict(zip(header, r)) for r in rows]


def make_defaults() -> dict[str, str]:
    """``VAR ?= value`` lines of the Makefile."""
    return dict(re.findall(r"^(\w+) \?= (.*)$", MAKEFILE, flags=re.M))


def make_targets() -> dict[str, tuple[list[str], str]]:
    """target -> (prerequisites, recipe text) for the Makefile's rules."""
    rules = {}
    for m in re.finditer(r"^([\w.$()/-]+):(.*)\n((?:\t.*\n?)*)", MAKEFILE, flags=re.M):
        if m.group(1) != ".PHONY":
            rules[m.group(1)] = (m.group(2).split(), m.group(3))
    return rules


def reached(targets: list[str], rules) -> set[str]:
    """Every target that running ``make targets`` runs: prerequisites and ``$(MAKE) t``."""
    seen, todo = set(), list(targets)
    while todo:
        t = todo.pop()
        if t in seen or t not in rules:
            continue
        seen.add(t)
        prereqs, recipe = rules[t]
        todo += prereqs + re.findall(r"\$\(MAKE\) ([\w-]+)", recipe)
    return seen


def ci_targets() -> list[str]:
    """The make targets .ci/run runs (its non-comment ``make ...`` lines)."""
    lines = [x.strip() for x in CI.splitlines() if not x.lstrip().startswith("#")]
    return [t for x in lines if x.startswith("make ") for t in x.split()[1:] if "=" not in t]


def pinned(value: str, package: str) -> str:
    """``megatron-core==0.19.2`` -> ``0.19.2`` (the Makefile's pins)."""
    m = re.fullmatch(rf"{re.escape(package)}==([\w.+]+)", value.strip())
    assert m, f"Makefile pins {package} as {value!r}, not {package}==<version>"
    return m.group(1)


def test_table_versions_are_the_makefile_pins():
    defaults, rows = make_defaults(), table_rows()
    assert [r["leg"] for r in rows] == ["0.16", "newest"]
    for row in rows:
        for column, package in (("megatron-core", "megatron-core"), ("torch", "torch")):
            version, var = re.fullmatch(r"([\w.+]+) .*\(`(\w+)=`\)", row[column]).groups()
            assert pinned(defaults[var], package) == version, (row["leg"], column)
    assert "3.12" in defaults["PY_NEWEST"]  # the newest leg's interpreter (the table's 3.12)
    assert "Megatron-Core 0.16.1, and the newest release, 0.19.2" in README.split("## Tests")[0]


def test_table_commands_are_make_targets_with_their_venvs():
    rules, defaults = make_targets(), make_defaults()
    for row in table_rows():
        target = re.fullmatch(r"`make ([\w-]+)`", row["command"]).group(1)
        assert target in rules, target
        venv = row["venv"].strip("`")
        recipe = rules[target][1]
        assert venv == defaults["VENV"] if "VENV=" not in recipe else f"VENV={venv}" in recipe


def test_ci_runs_the_legs_the_table_says():
    rules = make_targets()
    ran = reached(ci_targets(), rules)
    for r in table_rows():
        leg = re.fullmatch(r"`make ([\w-]+)`", r["command"]).group(1)
        assert r["CI"] in ("yes", "by hand"), r
        assert (leg in ran) == (r["CI"] == "yes"), f".ci/run reaches {sorted(ran)}; {r}"
    assert any(r["CI"] == "yes" for r in table_rows())
    said = re.findall(r"CI \(`\.ci/run`\) runs `make ([\w-]+)`", README.replace("\n", " "))
    assert said and all(t in ci_targets() for t in said), (said, ci_targets())
