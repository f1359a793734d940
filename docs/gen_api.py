"""Write ``docs/api.md``, the API reference, from the docstrings of the public surface.

Everything ``fedmm_secure.__all__`` exports (signature, docstring, public methods of classes),
then the extension points' contracts from their module docstrings. Plain ``inspect``: the output
is deterministic Markdown, so ``tests/test_api_docs.py`` can check it is current. ``make
api-docs`` runs this and also renders the same surface as browsable HTML with pdoc.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is stale
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import fedmm_secure

OUT = Path(__file__).with_name("api.md")

# Module docstrings that define an extension point's contract, in reading order.
EXTENSION_MODULES = [
    "fedmm_secure.data.loaders",
    "fedmm_secure.contracts.datasets",
    "fedmm_secure.models.registry",
    "fedmm_secure.contracts.ctr_models",
    "fedmm_secure.secagg.registry",
    "fedmm_secure.contracts.backends",
    "fedmm_secure.registry",
]

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc):`(~?)([\w.]+)`")


def markdown(text: str) -> str:
    """reST roles and double backticks as Markdown code spans."""
    # `~a.b.C` shows as `C` (the reST convention); `a.b.C` keeps its path.
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return text.replace("``", "`")


def _signature(obj: object) -> str:
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", sig)


def _doc(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return markdown(doc)


def _own_members(cls: type) -> list[tuple[str, object]]:
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))):
            continue
        out.append((name, value))
    return out


def _entry(name: str, obj: object) -> list[str]:
    lines = [f"### `{name}`", ""]
    module = getattr(obj, "__module__", None)
    if inspect.isclass(obj):
        lines += [f"*class* in `{module}`", "", "```python", f"{name}{_signature(obj)}", "```", ""]
    elif callable(obj):
        lines += [f"*function* in `{module}`", "", "```python", f"{name}{_signature(obj)}", "```", ""]
    else:
        lines += ["```python", f"{name} = {obj!r}", "```", ""]
    doc = _doc(obj) if inspect.isclass(obj) or callable(obj) else ""
    if doc:
        lines += [doc, ""]
    if inspect.isclass(obj):
        for member, value in _own_members(obj):
            target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            kind = "property" if isinstance(value, property) else "method"
            sig = "" if kind == "property" else _signature(target)
            first = _doc(target).split("\n\n")[0].replace("\n", " ")
            lines.append(f"- `{member}{sig}` ({kind}){': ' + first if first else ''}")
        if _own_members(obj):
            lines.append("")
    return lines


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `make api-docs` (do not edit by hand). Everything here is",
        "importable from `fedmm_secure`; HTML with search: `make api-docs`, then open",
        "`docs/api/index.html`.",
        "",
        "## Public surface (`fedmm_secure`)",
        "",
        markdown(inspect.getdoc(fedmm_secure) or ""),
        "",
    ]
    for name in fedmm_secure.__all__:
        lines += _entry(name, getattr(fedmm_secure, name))
    lines += ["## Extension points and their contracts", ""]
    for mod in EXTENSION_MODULES:
        lines += [f"### `{mod}`", "", markdown(inspect.getdoc(importlib.import_module(mod)) or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            sys.stderr.write("docs/api.md is stale: run `make api-docs`\n")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
