"""List the methods (paper, status), the configs grouped by method, the backbones (parameters) and the DataModules.

    lightning-methods list [--section methods configs backbones datamodules] [--format text|json] [--root DIR]

Everything is read from the installed package and the source tree, never from a hand-kept list: methods from the
method table of ``README.md`` (its Paper / Status / Entry point columns; the config folders a row names are that
method's), configs from ``configs/**/*.yaml`` (the first header line is the summary; ``# paper:`` lines give the
paper's numbers), backbones from the backbone registry (parameter counts of a model built on the ``meta`` device,
for ``--num_classes`` classes), DataModules from ``lightning_methods.datamodules``. ``--root`` is the source tree
(default: the current directory if it is a source tree of this package, else the tree this package was installed
from, else the current directory if it holds ``configs/``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

from lightning_methods.results.aggregate import paper_notes, paper_numbers

#: Width of the text output (descriptions are wrapped, never cut).
WIDTH = 120

#: Config folders that hold shared pieces or demos rather than one method's setups.
SHARED_FOLDERS = (".", "base")


def find_root(root: str | None = None) -> Path | None:
    """The source tree holding ``configs/`` (and ``README.md``): ``root``, else the current directory when it is a
    source tree of this package (it holds ``lightning_methods/`` too; a project of one's own with a ``configs/``
    folder is not), else the tree this package was installed from, else the current directory."""
    if root:
        return Path(root) if (Path(root) / "configs").is_dir() else None
    cwd, package = Path.cwd(), Path(__file__).resolve().parents[2]
    candidates = [cwd] if (cwd / "lightning_methods").is_dir() else []
    candidates += [package, cwd]
    return next((c for c in candidates if (c / "configs").is_dir()), None)


def readme_methods(readme: Path) -> list[dict[str, Any]]:
    """Rows of the README's ``## Methods`` table: method, paper, status, entry point, and the config folders named."""
    if not readme.is_file():
        return []
    rows, in_section, header = [], False, None
    for line in readme.read_text().splitlines():
        if line.startswith("## "):
            in_section = line.strip() == "## Methods"
            continue
        if not in_section or not line.startswith("|"):
            if header and rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        row = {k: _plain_markdown(v) for k, v in zip(header, cells)}
        entry = row.get("entry point", "")
        rows.append({"method": row.get("method", ""), "paper": row.get("paper", ""), "status": row.get("status", ""),
                     "entry_point": entry, "folders": re.findall(r"configs/([A-Za-z0-9_]+)/", entry)})
    return rows


def _plain_markdown(text: str) -> str:
    """A README cell as plain text: ``[docs](path)`` -> ``docs: path``; code spans keep their text verbatim (``mlp*``),
    backticks and emphasis markers outside them are dropped."""
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1: \2", text)
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p[1:-1] if p.startswith("`") else re.sub(r"\*+", "", p) for p in parts).strip()


def plain_rst(text: str) -> str:
    """Docstring text without reStructuredText markup, whitespace collapsed: ``:class:`~a.B``` -> ``B``,
    ``:func:`a.f``` -> ``a.f``, ``:meth:`title <target>``` -> ``title``, double and single backticks dropped."""

    def role(match: re.Match) -> str:
        target = match.group(1).split(" <", 1)[0].strip()
        return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target

    text = re.sub(r":[a-z]+:`([^`]*)`", role, text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence (a period followed by a space and an upper-case letter, or the
    end); the whole text when it has no such period."""
    match = re.search(r"\.(?=\s+[A-Z(])", text)
    return text[: match.end()] if match else text


def folder_paper(items: list[dict[str, Any]], root: Path) -> str:
    """The arXiv ids the configs of a folder cite in their headers, most cited first."""
    counts: dict[str, int] = {}
    for item in items:
        header = "\n".join(line for line in (root / item["path"]).read_text().splitlines()[:40] if line.startswith("#"))
        for arxiv in set(re.findall(r"arXiv[: ]*(\d{4}\.\d{4,5})", header)):
            counts[arxiv] = counts.get(arxiv, 0) + 1
    return ", ".join(f"arXiv {a}" for a in sorted(counts, key=lambda a: -counts[a])[:3])


def config_summary(path: Path) -> str:
    """The description of a config: the first sentence of its first header comment paragraph (the comment lines
    before an empty ``#`` line, an indented command line or a ``# paper:`` line), as plain text; a paragraph that
    leads into a command (``..., e.g.`` or ``...:``) ends with a period instead."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            if line.strip() or lines:
                break
            continue
        body = line[1:]
        if not body.strip() or body.startswith("   ") or body.strip().startswith("paper:"):  # paragraph end,
            # an indented command line or the paper's numbers
            if lines:
                break
            continue
        lines.append(body.strip())
    # a paragraph that leads into the command below it ("..., e.g." / "...:") ends its sentence there
    return first_sentence(plain_rst(re.sub(r"(,? e\.g\.|:)$", ".", " ".join(lines))))


def configs_by_folder(root: Path) -> dict[str, list[dict[str, Any]]]:
    """``{folder: [{"path", "summary", "paper", "paper_note"}, ...]}`` for every YAML under ``root/configs`` (folder
    ``.`` for the top level; ``paper_note``: the text of ``# paper:`` lines without a number)."""
    out: dict[str, list[dict[str, Any]]] = {}
    base = root / "configs"
    for path in sorted(base.rglob("*.yaml")):
        rel = path.relative_to(base)
        folder = rel.parts[0] if len(rel.parts) > 1 else "."
        out.setdefault(folder, []).append({"path": f"configs/{rel.as_posix()}", "file": str(path.resolve()),
                                           "summary": config_summary(path), "paper": paper_numbers(path),
                                           "paper_note": "; ".join(paper_notes(path))})
    return out


def backbone_table(num_classes: int = 100, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every registered backbone (or those in ``names``) with its parameter count (built on the ``meta`` device: no
    memory, no initialization cost)."""
    import torch

    from lightning_methods.models import available_backbones, create_backbone

    rows = []
    for name in names or available_backbones():
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = create_backbone(name, num_classes)
            rows.append({"name": name, "params": sum(p.numel() for p in model.parameters())})
        except Exception as err:  # a factory that needs arguments: listed without a count
            rows.append({"name": name, "params": None, "note": f"{type(err).__name__}: {err}"[:80]})
    return rows


def datamodule_table() -> list[dict[str, Any]]:
    """The DataModules exported by ``lightning_methods.datamodules`` with their class count and summary."""
    from lightning.pytorch import LightningDataModule

    from lightning_methods import datamodules

    rows = []
    for name in sorted(datamodules.__all__):
        obj = getattr(datamodules, name)
        if inspect.isclass(obj) and issubclass(obj, LightningDataModule):
            classes = getattr(obj, "num_classes", None)
            doc = first_sentence(plain_rst((inspect.getdoc(obj) or "").split("\n\n")[0]))
            rows.append({"name": name, "num_classes": classes if isinstance(classes, int) and classes > 0 else None,
                         "summary": doc})
    return rows


def catalog(root: Path | None, sections: list[str], num_classes: int = 100) -> dict[str, Any]:
    """The catalog as plain data (what ``--format json`` prints)."""
    out: dict[str, Any] = {}
    configs = configs_by_folder(root) if root else {}
    if "methods" in sections:
        methods = readme_methods(root / "README.md") if root else []
        named = {f for m in methods for f in m["folders"]} | set(SHARED_FOLDERS)
        for folder, items in configs.items():
            if folder not in named:
                methods.append({"method": f"configs/{folder}/ (not in the README method table yet)", "status": "",
                                "paper": f"cited in its config headers: {folder_paper(items, root) or '-'}",
                                "entry_point": f"configs/{folder}/", "folders": [folder]})
        out["methods"] = methods
    if "configs" in sections:
        out["configs"] = configs
    if "backbones" in sections:
        out["backbones"] = backbone_table(num_classes)
    if "datamodules" in sections:
        out["datamodules"] = datamodule_table()
    return out


def _params(n: int | None) -> str:
    return "?" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K")


def render(data: dict[str, Any], root: Path | None) -> str:
    lines: list[str] = []
    if "methods" in data:
        lines += ["Methods (README.md method table; configs/<folder>/ of each)", ""]
        for m in data["methods"]:
            status = f" [{m['status']}]" if m["status"] else ""
            lines.append(f"  {m['method']}{status}")
            if m["paper"]:
                lines.append(f"      paper: {m['paper']}")
            lines.append(f"      use: {m['entry_point']}")
        lines.append("")
    if "configs" in data:
        lines += [f"Configs ({sum(map(len, data['configs'].values()))} under {root / 'configs' if root else '-'}; "
                  "absolute paths, usable from any folder): lightning-methods fit --config PATH", ""]
        if root is None:
            lines.append("  configs/ not found: run this in the repository, or pass --root DIR")
        for folder, items in data["configs"].items():
            lines.append(f"  {folder}/ ({len(items)})")
            for item in items:
                paper = ", ".join(f"{k}={v:g}" for k, v in item["paper"].items()) or item.get("paper_note", "")
                lines.append(f"    {item.get('file') or item['path']}" + (f"  [paper: {paper}]" if paper else ""))
                if item["summary"]:
                    lines += textwrap.wrap(item["summary"], WIDTH, initial_indent=" " * 8, subsequent_indent=" " * 8)
        lines.append("")
    if "backbones" in data:
        lines += ["Backbones (model.init_args.backbone; parameters for 100 classes unless --num_classes)", ""]
        width = max((len(b["name"]) for b in data["backbones"]), default=10) + 2
        lines += [f"  {b['name']:<{width}}{_params(b['params']):>9}" for b in data["backbones"]]
        lines.append("")
    if "datamodules" in data:
        lines += ["DataModules (data.class_path: lightning_methods.datamodules.<Name>)", ""]
        width = max((len(d["name"]) for d in data["datamodules"]), default=10) + 2
        for d in data["datamodules"]:
            classes = f"{d['num_classes']} classes" if d["num_classes"] else ""
            indent = " " * (2 + width + 13)
            lines += textwrap.wrap(d["summary"] or "-", WIDTH, initial_indent=f"  {d['name']:<{width}}{classes:<13}",
                                   subsequent_indent=indent)
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    sections = ["methods", "configs", "backbones", "datamodules"]
    parser = argparse.ArgumentParser(prog="lightning-methods list", description=__doc__.split("\n")[0])
    parser.add_argument("--section", nargs="+", choices=sections, default=sections, help="what to list (default: all)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--root", help="source tree with configs/ and README.md")
    parser.add_argument("--num_classes", type=int, default=100, help="classes for the parameter counts (100)")
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``lightning-methods list`` (see the module docstring); returns the catalog data."""
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if args is None else args)
    root = find_root(ns.root)
    if ns.root and root is None:
        parser.error(f"--root {ns.root} has no configs/ folder")
    data = catalog(root, ns.section, ns.num_classes)
    print(json.dumps(data, indent=1) if ns.format == "json" else render(data, root), end="")
    return data
