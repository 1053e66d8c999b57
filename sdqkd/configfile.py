"""Config files of our processes (JSON onto dataclasses): every problem collected with its path,
so a file is fixed in one go; shared by the agent's and the controller's configs."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The config file is unusable; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def read_json(path: Path | str) -> Any:
    """The file's JSON, or ConfigError saying why not."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None


def parse_into(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    """`data` as an instance of `cls` (a dataclass, list, dict, union or plain type); what does
    not fit is appended to `problems` (unknown keys, missing fields, wrong types)."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_into(inner[0], data, path, problems)
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            problems.append(f"{path}: expected an object")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                problems.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = parse_into(hints[name], data[name], f"{path}.{name}", problems)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                problems.append(f"{path}.{name}: missing")
        try:
            return cls(**kwargs)
        except TypeError:
            return None
    if origin is list:
        if not isinstance(data, list):
            problems.append(f"{path}: expected a list")
            return []
        return [parse_into(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            problems.append(f"{path}: expected an object")
            return {}
        return {k: parse_into(args[1], v, f"{path}.{k}", problems) for k, v in data.items()}
    if cls is Any:
        return data
    if cls is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if not isinstance(data, cls) or (cls is int and isinstance(data, bool)):
        problems.append(f"{path}: expected {cls.__name__}, got {type(data).__name__}")
        return None
    return data
