"""`wdl config reference` and `wdl config show`: the config tree as documentation.

    wdl config reference [--out docs/config-reference.md]   every key: type, default, allowed values, meaning
    wdl config show --config C [key.path=value ...]          the resolved config as YAML, every default filled in

The meaning of a key is the comment written beside or right above its field in wdl/config.py
(read with tokenize and ast), so the reference is made from the code and cannot drift from it;
a field without a comment is an error here, and tests/test_config_reference.py fails on it and
on a docs/config-reference.md older than the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from wdl.errors import ConfigError

REFERENCE = Path("docs/config-reference.md")


@dataclass
class Key:
    """One leaf of the config tree as the reference shows it."""
    path: str      # e.g. optim.deep.weight_decay; NAME stands for a key the user chooses
    type: str
    default: str
    allowed: str
    meaning: str


def field_comments(module: types.ModuleType) -> dict[str, dict[str, str]]:
    """class name -> field name -> its comment in `module`'s source: the comment lines right
    above the field (no blank line between) and the comment at the end of its line(s)."""
    source = inspect.getsource(module)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line in comments and line not in code_lines:  # a comment-only line
                above.insert(0, comments[line])
                line -= 1
            after = [comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
            fields[item.target.id] = " ".join(above + after).strip()
    return found


def describe_type(tp: Any) -> tuple[str, str]:
    """(type as a reader says it, allowed values or "") of a field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "string", " \\| ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        kinds = " or ".join(t if not allowed else allowed for t, allowed in parts)
        return (kinds + " or null" if type(None) in args else kinds), ""
    if origin is list:
        return f"list of {describe_type(args[0])[0]}", ""
    if origin is dict:
        inner = args[1]
        return f"mapping: name -> {'section (below)' if dataclasses.is_dataclass(inner) else describe_type(inner)[0]}", ""
    if tp is bool:
        return "bool", "true \\| false"
    return {int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp))), ""


def _default(value: Any) -> str:
    if value == "":
        return '""'
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def keys(module: types.ModuleType | None = None, root: type | None = None) -> list[Key]:
    """Every leaf key of the tree under `root` (default: wdl.config.Config), in source order.
    Raises ConfigError naming every field that has no comment to describe it."""
    if module is None:
        import wdl.config as module
    root = root or module.Config
    comments = field_comments(module)
    allowed_by_path = _checked_strings(module)
    out: list[Key] = []
    missing: list[str] = []

    def walk(cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path, tp, value = f"{prefix}{f.name}", hints[f.name], getattr(instance, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, value, path + ".")  # the parent's default (optim.wide is FTRL's)
                continue
            meaning = comments.get(cls.__name__, {}).get(f.name, "")
            if not meaning and f"{cls.__name__}.{f.name}" not in missing:
                missing.append(f"{cls.__name__}.{f.name}")  # once, though optim.wide and optim.deep share it
            kind, allowed = describe_type(tp)
            if path in allowed_by_path:
                allowed = " \\| ".join(allowed_by_path[path])
            out.append(Key(path, kind, _default(value), allowed, meaning.replace("|", "\\|")))
            inner = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
            if dataclasses.is_dataclass(inner):
                walk(inner, inner(), f"{path}.NAME.")

    walk(root, root(), "")
    if missing:
        raise ConfigError(f"config fields without a comment to describe them in {module.__name__}: {', '.join(missing)} "
                          "(a comment beside or right above each field is its line in the reference)")
    return out


def _checked_strings(module: types.ModuleType) -> dict[str, tuple[str, ...]]:
    """String keys whose values wdl/config_checks.py checks against a list (not a Literal type)."""
    found = {}
    if hasattr(module, "COMPILE_MODES"):
        found["train.compile"] = tuple(module.COMPILE_MODES)
    if hasattr(module, "SHARDING_TYPES"):
        found["distributed.sharding"] = ("auto", *module.SHARDING_TYPES)
    return found


def reference(module: types.ModuleType | None = None) -> str:
    """The Markdown of docs/config-reference.md."""
    rows = keys(module)
    lines = ["# Configuration reference", "",
             "Every key of a training config, generated from `wdl/config.py` (the comment beside each field) by",
             "`wdl config reference --out docs/config-reference.md`; `tests/test_config_reference.py` fails when this",
             "file is older than the code. How a config is written and overridden: [configuration.md](configuration.md).",
             "`wdl config show --config FILE [key=value ...]` prints a config with every default filled in.", ""]
    section = None
    for k in rows:
        top = k.path.split(".")[0]
        if top != section:
            section = top
            lines += [f"## {top}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        lines.append(f"| `{k.path}` | {k.type} | `{k.default}` | {k.allowed} | {k.meaning} |")
        if k is rows[-1] or rows[rows.index(k) + 1].path.split(".")[0] != top:
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="the config keys (reference) or a resolved config (show)")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    ref = config_sub.add_parser("reference", help="every config key with type, default and meaning, as Markdown")
    ref.add_argument("--out", default=None, metavar="FILE", help=f"write it there (e.g. {REFERENCE}) instead of stdout")
    ref.set_defaults(func=reference_main)
    show = config_sub.add_parser("show", help="a config file with overrides applied and every default filled in, as YAML")
    show.add_argument("--config", required=True, help="YAML config file (see configs/)")
    show.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides, as for wdl train")
    show.set_defaults(func=show_main)


def reference_main(args: argparse.Namespace) -> int:
    text = reference()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
    print(f"wdl: wrote the config reference ({len(keys())} keys) to {out}")
    return 0


def show_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0
