"""The options of the data commands: one frozen dataclass per command (CriteoOptions,
MovieLensOptions, GenerateOptions, ImportOptions, beside the code they steer), whose fields are
the command's flags and whose `__post_init__` is the one place a bad value is refused, for the
command line and Python callers alike. The flags take their defaults and choices from the same
dataclass and constants, and are named like its fields, so `from_args` maps them across.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def resolve(cls: type[T], opts: T | None, overrides: dict[str, Any]) -> T:
    """`opts` (or the defaults of `cls`) with `overrides` applied, checked."""
    return dataclasses.replace(opts, **overrides) if opts is not None else cls(**overrides)


def from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of options class `cls` that the parsed command line `args` holds."""
    given = vars(args)
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}


def seed_problem(seed: Any) -> str | None:
    """Why `seed` cannot seed a data command (it is hashed as an unsigned 64-bit number and fed to
    numpy's generators), or None."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        return f"the seed must be an integer in [0, 2^63), got {seed!r}"
    return None
