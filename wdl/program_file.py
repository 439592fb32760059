"""Refusing an exported program (`model.pt2`) that would run code when loaded.

`torch.export.load` (torch 2.13) is not a data-only reader. It unpickles, with
weights_only=False, every weight or constant its archive's configs mark `use_pickle`, pickled
custom objects, legacy `.pt` payloads, and the sample inputs when they fail to load as plain
tensors; it loads compiled AOTInductor libraries; it evaluates each symbolic shape
(`expr_str`) with sympy's `sympify` (Python's eval), and `.module()` compiles the program's
`guards_code` with exec. So before torch sees a file, `check_program_file` holds it to what
wdl's own export writes: the archive's files by name, tensors stored raw, aten operators only,
and shape expressions and guards made of symbols, numbers and comparisons. See docs/trust.md.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from wdl.errors import ArtefactError, first_line

# The files of a torch.export archive without pickles or compiled code, under its root folder.
_FILES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                    r"|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                    r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
                    r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+)")
_TARGET = re.compile(r"torch\.ops\.aten\.[a-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
# A shape expression: torch's symbols (s0, u1, ...), numbers, arithmetic and the names torch's
# deserializer gives sympy; nothing that reaches Python's builtins.
_EXPR_TOKEN = re.compile(r"\s+|\d+(?:\.\d+)?|'(?:s|u|ps|zuf|zf)\d+'|[A-Za-z_]\w*|\*\*|//|==|!=|<=|>=|[-+*/%(),=<>]")
_EXPR_NAMES = {"Symbol", "True", "False", "positive", "integer", "nonnegative", "real", "finite", "Max", "Min",
               "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
               "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "Eq", "Ne", "Le", "Lt", "Ge", "Gt"}
_SYMBOL = re.compile(r"(?:s|u|ps|zuf|zf)\d+")
# A guard: sizes of the inputs (L['name'][i].size()[j]) compared with numbers and one another.
_GUARD_TOKEN = re.compile(r"\s+|L\['[A-Za-z_]\w*'\]|\[\d+\]|\.size\(\)|\.stride\(\)|\d+|==|!=|<=|>=|[-+*%()<>]")


def check_program_file(path: Path) -> None:
    """An ArtefactError (one line) unless `path` is a torch.export archive holding only data."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtefactError(f"{path}: cannot load it (not a torch.export archive: {first_line(e)})") from None
    with archive:
        names = archive.namelist()
        root = names[0].split("/")[0] + "/" if names else ""
        for name in names:
            inner = name[len(root):] if name.startswith(root) else name
            if not _FILES.fullmatch(inner):
                _refuse(path, f"holds {inner}, which wdl's export never writes (a pickle, compiled code or an older format)")
        for name in names:
            inner = name[len(root):]
            if inner.endswith(("_weights_config.json", "_constants_config.json")):
                for fqn, entry in _json(path, archive, name).get("config", {}).items():
                    if entry.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", str(entry.get("path_name"))):
                        _refuse(path, f"asks to unpickle {fqn!r} ({inner}: use_pickle)")
            elif inner.startswith("data/sample_inputs/"):
                try:  # torch retries a failure with weights_only=False
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:
                    _refuse(path, f"its sample inputs ({inner}) are not plain tensors ({first_line(e)})")
            elif inner.startswith("models/"):
                _check_program(path, _json(path, archive, name))


def _check_program(path: Path, program: dict[str, Any]) -> None:
    for key, value in _items(program):
        if key == "target" and isinstance(value, str) and not _TARGET.fullmatch(value):
            _refuse(path, f"calls {value!r}, not an aten operator")
        if key == "expr_str" and not _tokens_ok(value, _EXPR_TOKEN, _expr_name):
            _refuse(path, f"holds the shape expression {value[:80]!r}, which is not symbols and numbers")
    for guard in program.get("guards_code") or []:
        if not _tokens_ok(guard, _GUARD_TOKEN, lambda token: False):
            _refuse(path, f"holds the guard {str(guard)[:80]!r}, which is not a comparison of input sizes")


def _expr_name(token: str) -> bool:
    return token in _EXPR_NAMES or bool(_SYMBOL.fullmatch(token))


def _tokens_ok(text: Any, token: re.Pattern, name_ok) -> bool:
    """`text` is a string made only of `token`s, its bare names (letters first) passing `name_ok`."""
    if not isinstance(text, str):
        return False
    pos = 0
    while pos < len(text):
        m = token.match(text, pos)
        if m is None:
            return False
        word = m.group()
        if (word[0].isalpha() or word[0] == "_") and not word.startswith("L[") and not name_ok(word):
            return False
        pos = m.end()
    return True


def _items(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a parsed JSON document, at any depth."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                yield k, v
                stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _json(path: Path, archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(archive.read(name))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ArtefactError(f"{path}: cannot load it ({name}: {first_line(e)})") from None
    if not isinstance(doc, dict):
        raise ArtefactError(f"{path}: cannot load it ({name} is not a JSON object)")
    return doc


def _refuse(path: Path, why: str) -> None:
    raise ArtefactError(f"{path}: {why}; refused (wdl loads only data from files: see docs/trust.md)")
