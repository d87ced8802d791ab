"""The docs stay navigable and true to the code: the README is short, every relative link in the
README and docs/ lands on a file and heading that exist, every docs page is two clicks from the
README, and docs/configuration.md is exactly what `python -m self_healing.config_reference` prints
(so a new or changed `HealingConfig` field, or a preset edit, without regenerating it fails here)."""
import dataclasses
import re
from pathlib import Path

import pytest

from self_healing import HealingConfig
from self_healing.config_reference import field_docs, main, preset_files, render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_LIMIT = 15 * 1024

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a `[x](y)` inside code is not a link)."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markdown links reduced to their text, lowercased, every
    character that is not a letter, digit, space, '-' or '_' dropped, spaces made '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(path.read_text(encoding="utf-8")))]


def _local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: ...


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT}: move detail to docs/"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q -n 2\n" in ci and "python -m pytest -q -n 2\n" in README.read_text()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if not _local(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_two_clicks_from_the_readme():
    def linked(page: Path) -> set[Path]:
        out = set()
        for target in links(page):
            if _local(target) and target.partition("#")[0].endswith(".md"):
                out.add((page.parent / target.partition("#")[0]).resolve())
        return out

    one = linked(README)
    two = set().union(*(linked(p) for p in one if p.exists()))
    unreachable = [p.name for p in DOCS.glob("*.md") if p.resolve() not in one | two]
    assert not unreachable, f"docs pages not reachable from README.md in two clicks: {unreachable}"


def test_slug_matches_github():
    assert slug("Hangs, preemption and goodput") == "hangs-preemption-and-goodput"
    assert slug("`nan_patience`") == "nan_patience"
    assert slug("ZClip (adaptive clipping)") == "zclip-adaptive-clipping"
    assert slug("Gradient / LR / state signals") == "gradient--lr--state-signals"


# --- the generated configuration reference ---------------------------------------------------------

def test_configuration_reference_is_current():
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/configuration.md is stale: run `python -m self_healing.config_reference > docs/configuration.md`")


def test_every_field_is_described():
    docs = field_docs()
    assert [d.name for d in docs] == [f.name for f in dataclasses.fields(HealingConfig)]
    missing = [d.name for d in docs if not d.doc]
    assert not missing, f"HealingConfig fields without an attribute docstring: {missing}"
    assert all(d.type and d.accepted for d in docs), [d.name for d in docs if not (d.type and d.accepted)]


def test_reference_has_every_field_and_preset_value():
    text = render()
    presets = preset_files()
    assert set(presets) >= {"default", "aggressive", "conservative"}
    assert set(presets) == {p.stem for p in (ROOT / "presets").glob("*.yaml")}
    for d in field_docs():
        assert f"### `{d.name}`" in text
    # a preset value that differs from the default is shown in the field's line
    assert "aggressive `1`; conservative `10`" in text.split("### `nan_patience`", 1)[1].split("###", 1)[0]


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(render())
    assert main(["--check", str(page)]) == 0
    page.write_text(render().replace("nan_patience", "nan_patiance", 1))
    assert main(["--check", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
