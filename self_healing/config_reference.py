"""Generate `docs/configuration.md` from `HealingConfig` itself.

    python -m self_healing.config_reference > docs/configuration.md   # regenerate
    python -m self_healing.config_reference --check docs/configuration.md  # exit 1 if stale

Every field comes from the dataclass (name, default), its type and description from the source of
`self_healing/config.py` (the annotation and the attribute docstring under it, read with `ast`;
the `# --- section ---` comments group them), what values are accepted from the validator itself
(`HealingConfig.problems`), and each preset's value from the YAML files shipped in
`self_healing.presets`. Nothing is written by hand, so the page cannot drift from the code:
`tests/test_docs.py` fails when the committed page differs from what this prints, or when a field
has no description.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .config import PRESET_NAMES, HealingConfig

_SECTION = re.compile(r"^\s*# --- (.+?) -*\s*$")


@dataclass
class FieldDoc:
    name: str
    type: str
    default: Any
    doc: str
    section: str
    accepted: str


def _dedent_doc(text: str) -> str:
    return " ".join(line.strip() for line in inspect.cleandoc(text).splitlines() if line.strip())


def field_docs() -> list[FieldDoc]:
    """One entry per `HealingConfig` field, in declaration order. A field without an attribute
    docstring gets `doc == ""` (the test refuses that)."""
    source = inspect.getsource(HealingConfig)
    lines = source.splitlines()
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    body = cls.body
    found: dict[str, tuple[str, str, str]] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = _dedent_doc(nxt.value.value)
        section = ""
        for line in reversed(lines[: node.lineno - 1]):
            m = _SECTION.match(line)
            if m:
                # "early warning (self_healing.early_warning, ...)": the heading keeps the topic only
                section = re.sub(r"\s*\([^)]*self_healing\.[^)]*\)", "", m.group(1)).strip()
                break
        found[node.target.id] = (ast.unparse(node.annotation), doc, section)
    out = []
    for f in dataclasses.fields(HealingConfig):
        typ, doc, section = found.get(f.name, (str(f.type), "", ""))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append(FieldDoc(f.name, typ, default, doc, section, _accepted(f.name)))
    return out


def _accepted(name: str) -> str:
    """What the validator accepts for `name`, in its own words: the message it gives for a value
    no field accepts."""
    class _Nothing:
        def __repr__(self) -> str:
            return "<x>"

    for msg in HealingConfig.problems({name: _Nothing()}):
        if msg.startswith(f"HealingConfig.{name}=") and "expected " in msg:
            accepted = re.sub(r"\b\d{7,}\.0\b", lambda m: f"{float(m.group()):g}", msg.split("expected ", 1)[1])
            if getattr(HealingConfig, name, "") is None and "null" not in accepted:
                accepted = "null or " + accepted
            return accepted
    return ""


def preset_files() -> dict[str, dict[str, Any]]:
    """name -> every field's value under that preset's YAML file (built-in names first, then others)."""
    try:
        folder: Any = resources.files("self_healing.presets")
    except ModuleNotFoundError:  # a source checkout whose install does not map the package data
        folder = Path(__file__).resolve().parents[1] / "presets"
    files = {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}
    names = [n for n in PRESET_NAMES if n in files] + sorted(n for n in files if n not in PRESET_NAMES)
    return {n: HealingConfig.from_yaml_text(files[n].read_bytes(), source=f"preset {n!r}").to_dict() for n in names}


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _code(v: Any) -> str:
    return f"`{_value(v)}`".replace("|", "\\|")  # a pipe inside a table cell ends the cell


def _code_text(text: str) -> str:
    return f"`{text}`".replace("|", "\\|")


def _anchor(name: str) -> str:
    return name  # GitHub's slug of the heading "`name`" (lowercase letters, digits and "_" are kept)


def render() -> str:
    docs = field_docs()
    presets = preset_files()
    names = list(presets)
    out: list[str] = []
    w = out.append
    w("# Configuration reference")
    w("")
    w("<!-- Generated by `python -m self_healing.config_reference > docs/configuration.md`; do not edit. -->")
    w("<!-- tests/test_docs.py fails when this page differs from what the generator prints. -->")
    w("")
    w("Every field of `HealingConfig` (`self_healing/config.py`), its type, default, its value in each "
      "preset file in `presets/` and what it does. Build a config in Python or from YAML:")
    w("")
    w("```python")
    w("from self_healing import HealingConfig")
    w("cfg = HealingConfig(nan_patience=1, zclip_enabled=True)          # any field as a keyword")
    w("cfg = HealingConfig.aggressive()                                  # or .default(), .conservative()")
    w('cfg = HealingConfig.from_preset("my.yaml").replace(auto_resume=False)')
    w("```")
    w("")
    w("`self-healing presets NAME > my.yaml` writes a preset as a YAML file to start from; "
      "`self-healing validate my.yaml` names every bad field (see [cli.md](cli.md)). An unknown field or a "
      "value outside what is accepted raises `ValueError` naming the field, at construction and on assignment.")
    w("")
    w("## Presets")
    w("")
    w("| field | " + " | ".join(names) + " |")
    w("|---|" + "---|" * len(names))
    for d in docs:
        vals = [presets[n].get(d.name, d.default) for n in names]
        if any(v != d.default for v in vals):
            w(f"| [`{d.name}`](#{_anchor(d.name)}) | " + " | ".join(_code(v) for v in vals) + " |")
    w("")
    w("Only the fields in which a preset differs from the dataclass default are listed here; every "
      "other field has its default in every preset.")
    w("")
    w("`default` never changes a healthy run: a clean run trains exactly like the bare trainer (tested; "
      "[reliability.md](reliability.md#precision-healthy-runs-untouched)). `aggressive` heals at the first sign "
      "of trouble and turns on ZClip, whose adaptive threshold replaces the Trainer's fixed `max_grad_norm` after "
      "its warm-up ([healing.md](healing.md#zclip-adaptive-gradient-clipping)). `conservative` intervenes only on "
      "clear failures and gives up early.")
    w("")
    w("## All fields")
    w("")
    w("| field | type | default |")
    w("|---|---|---|")
    section = None
    for d in docs:
        if d.section != section:
            section = d.section
            w(f"| *{section or 'other'}* | | |")
        w(f"| [`{d.name}`](#{_anchor(d.name)}) | {_code_text(d.type)} | {_code(d.default)} |")
    w("")
    section = None
    for d in docs:
        if d.section != section:
            section = d.section
            w(f"## {section[:1].upper() + section[1:] if section else 'Other'}")
            w("")
        w(f"### `{d.name}`")
        w("")
        parts = [f"`{d.type}`, default {_code(d.default)}"]
        differing = [f"{n} {_code(presets[n][d.name])}" for n in names
                     if d.name in presets[n] and presets[n][d.name] != d.default]
        if differing:
            parts.append("; ".join(differing))
        w(". ".join(parts) + ("." if not d.accepted else f". Accepted: {d.accepted}."))
        w("")
        w(d.doc or "(no description)")
        w("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv[:1] == ["--check"]:
        path = argv[1] if len(argv) > 1 else "docs/configuration.md"
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except OSError as e:
            print(f"{path}: {e.strerror}", file=sys.stderr)
            return 1
        if current != text:
            print(f"{path} is stale: run `python -m self_healing.config_reference > {path}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
