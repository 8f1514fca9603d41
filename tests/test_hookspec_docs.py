"""docs/plugins.md documents every hook with the signature that medtl/hookspecs.py defines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import medtl.hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
REQUIRED_PARTS = ("**Returns**", "**Results from several plugins**", "**Called**", "**Example**")


def _normalize(text: str) -> str:
    # Specs quote annotations that are only imported for type checking; docs do not.
    return re.sub(r"\s+", " ", text.replace("'", "").replace('"', "")).strip()


def _spec_signatures() -> dict[str, str]:
    tree = ast.parse(Path(medtl.hookspecs.__file__).read_text(encoding="utf-8"))
    signatures = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("medtl_"):
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            signatures[node.name] = _normalize(f"def {node.name}({ast.unparse(node.args)}){returns}:")
    return signatures


def _doc_sections() -> dict[str, str]:
    text = DOCS.read_text(encoding="utf-8")
    parts = re.split(r"^### `(medtl_\w+)`\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


SPECS = _spec_signatures()


def test_hookspecs_found():
    assert "medtl_register_backbones" in SPECS
    assert len(SPECS) >= 10


@pytest.mark.parametrize("hook", sorted(SPECS))
def test_hook_documented_with_signature(hook):
    sections = _doc_sections()
    assert hook in sections, f"docs/plugins.md has no '### `{hook}`' section"
    documented = [_normalize(line) for line in sections[hook].splitlines() if line.startswith(f"def {hook}(")]
    assert documented, f"the {hook} section of docs/plugins.md shows no 'def {hook}(...)' signature"
    assert documented[0] == SPECS[hook], (
        f"docs/plugins.md documents {documented[0]!r} but medtl/hookspecs.py defines {SPECS[hook]!r}"
    )


@pytest.mark.parametrize("hook", sorted(SPECS))
def test_hook_section_complete(hook):
    section = _doc_sections().get(hook, "")
    missing = [part for part in REQUIRED_PARTS if part not in section]
    assert not missing, f"the {hook} section of docs/plugins.md lacks {', '.join(missing)}"


def test_docs_name_no_removed_hook():
    stale = sorted(set(_doc_sections()) - set(SPECS))
    assert not stale, f"docs/plugins.md documents hooks that medtl/hookspecs.py does not define: {stale}"


def test_signature_normalization():
    spec = SPECS["medtl_epoch_end"]
    assert _normalize("def medtl_epoch_end(run: RunContext, epoch: int) -> None:") != spec
    assert _normalize("def  medtl_epoch_end(run: 'RunContext', epoch: int, metrics: dict[str, float]) -> None:") == spec
