"""Reading YAML configuration into validated values, with every problem named by key path.

Shared by the agent and the collector. A config is read once, at start: every problem is
collected (not just the first), each with its key path and, where known, its line, so
``--check`` can print them all at once.

- ``${VAR}`` and ``${VAR:-default}`` expand from the environment in any string value.
- Durations accept ``10``, ``10s``, ``1.5s``, ``5m``, ``1h``, ``1d``, ``250ms``.
- A secret ``password`` may be given as ``password_file`` (the file's content, stripped);
  secrets are held in :class:`Secret`, whose ``repr`` and ``str`` never show the value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Pattern

import yaml

MISSING: Any = object()

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path or '(top level)'}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def print_config_error(exc: ConfigError, stream=None) -> int:
    """Print every problem of ``exc`` (key path, line, reason) for a CLI; returns exit code 2."""
    import sys
    stream = sys.stderr if stream is None else stream
    print(f"{exc.source}: configuration is not valid:", file=stream)
    for problem in exc.problems:
        print(f"  {problem}", file=stream)
    return 2


class Secret:
    """A credential. Never printed: ``str()`` and ``repr()`` hide it; ``reveal()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(value: object) -> float:
    """Seconds from ``10``, ``10s``, ``5m``, ``1h``...; ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. 10, 10s, 5m, 1h)")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


class _Context:
    def __init__(self, source: str, lines: dict[str, int], environ: dict[str, str]):
        self.source = source
        self.lines = lines
        self.environ = environ
        self.problems: list[Problem] = []
        #: When a list, every key a reader asked for: (path, kind, default) — the reference docs.
        self.notes: list[tuple[str, str, Any]] | None = None

    def add(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        if line is None:  # fall back to the nearest enclosing key we know the line of
            parent = path
            while line is None and "." in parent:
                parent = parent.rsplit(".", 1)[0]
                line = self.lines.get(parent)
        self.problems.append(Problem(path, message, line))


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _compose(text: str, source: str, environ: dict[str, str]) -> tuple[Any, _Context]:
    """Parse YAML into plain data, noting the line of every key path and expanding ${VAR}."""
    ctx = _Context(source, {}, environ)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        ctx.problems.append(Problem("", f"not valid YAML: {getattr(exc, 'problem', None) or exc}", line))
        return None, ctx
    finally:
        loader.dispose()

    def build(node: yaml.Node, path: str) -> Any:
        ctx.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    key = str(key)
                sub = _join(path, key)
                ctx.lines[sub] = key_node.start_mark.line + 1
                if key in out:
                    ctx.add(sub, "key appears twice")
                out[key] = build(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, _join(path, i)) for i, item in enumerate(node.value)]
        value = loader.construct_object(node, deep=True)
        if isinstance(value, str) and "${" in value:
            value = _expand(value, path)
        return value

    def _expand(value: str, path: str) -> str:
        def one(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in environ and (environ[name] != "" or default is None):
                return environ[name]
            if default is not None:
                return default
            ctx.add(path, f"environment variable {name} is not set")
            return ""
        return _ENV_REF.sub(one, value)

    if root is None:
        return {}, ctx
    return build(root, ""), ctx


class Section:
    """A mapping in the config, read key by key. Problems go to the shared context.

    Each reader returns a valid value or the default; after reading, :meth:`done` reports
    keys nobody asked for (most often a typo).
    """

    def __init__(self, data: Any, path: str, ctx: _Context):
        self._path = path
        self._ctx = ctx
        self._seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            ctx.add(path, f"expected a mapping, got {_kind(data)}")
            data = {}
        self._data: dict[str, Any] = data

    # -- plumbing --------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    def keys(self) -> list[str]:
        return list(self._data)

    def has(self, key: str) -> bool:
        return key in self._data

    def problem(self, key: str | None, message: str) -> None:
        """Report a problem at ``key`` of this section (or at the section itself)."""
        self._ctx.add(self._path if key is None else _join(self._path, key), message)

    def note(self, key: str, kind: str, default: Any) -> None:
        """Record that ``key`` exists, its kind and default (for the generated config reference)."""
        if self._ctx.notes is not None:
            self._ctx.notes.append((_join(self._path, key), kind, default))

    def raw(self, key: str, default: Any = MISSING) -> Any:
        if not isinstance(default, (dict, list)):
            self.note(key, "value", default)
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is MISSING:
            self.problem(key, "is required")
            return None
        return default

    def _typed(self, key: str, default: Any, convert: Callable[[Any], Any]) -> Any:
        value = self.raw(key, default)
        if value is None or (value is default and key not in self._data):
            return value
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            self.problem(key, str(exc))
            return None if default is MISSING else default

    # -- readers ---------------------------------------------------------------------------
    def str(self, key: str, default: Any = MISSING, pattern: Pattern[str] | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
        self.note(key, 'string', default)
        def convert(v: Any) -> str:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError(f"expected a string, got {_kind(v)}")
            v = str(v)
            if pattern is not None and not pattern.fullmatch(v):
                raise ValueError(f"{v!r} does not match {pattern.pattern}")
            if choices is not None and v not in choices:
                raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
            return v
        return self._typed(key, default, convert)

    def int(self, key: str, default: Any = MISSING, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        self.note(key, 'integer', default)
        def convert(v: Any) -> int:
            if isinstance(v, bool):
                raise ValueError(f"expected an integer, got {v!r}")
            if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
                v = int(v)
            if not isinstance(v, int):
                raise ValueError(f"expected an integer, got {v!r}")
            _check_range(v, minimum, maximum)
            return v
        return self._typed(key, default, convert)

    def float(self, key: str, default: Any = MISSING, minimum: float | None = None,
              maximum: float | None = None) -> Any:
        self.note(key, 'number', default)
        def convert(v: Any) -> float:
            if isinstance(v, bool):
                raise ValueError(f"expected a number, got {v!r}")
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {v!r}") from None
            if f != f or f in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number, got {v!r}")
            _check_range(f, minimum, maximum)
            return f
        return self._typed(key, default, convert)

    def bool(self, key: str, default: Any = MISSING) -> Any:
        self.note(key, 'boolean', default)
        def convert(v: Any) -> bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return v.lower() in ("true", "yes", "on", "1")
            raise ValueError(f"expected true or false, got {v!r}")
        return self._typed(key, default, convert)

    def duration(self, key: str, default: Any = MISSING, minimum: float | None = None,
                 maximum: float | None = None) -> Any:
        self.note(key, 'duration', default)
        def convert(v: Any) -> float:
            seconds = parse_duration(v)
            _check_range(seconds, minimum, maximum, unit="s")
            return seconds
        if isinstance(default, str):
            default = parse_duration(default)
        return self._typed(key, default, convert)

    def path_value(self, key: str, default: Any = MISSING) -> Any:
        value = self.str(key, default)  # noted as a string
        return Path(value) if isinstance(value, str) else value

    def str_list(self, key: str, default: Any = MISSING) -> Any:
        self.note(key, 'list of strings', default)
        def convert(v: Any) -> tuple[str, ...]:
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(i, str) and i for i in v):
                raise ValueError(f"expected a list of strings, got {_kind(v)}")
            return tuple(v)
        return self._typed(key, default, convert)

    def secret(self, key: str, required: bool = False) -> Secret | None:
        """``key`` inline, or ``key_file`` naming a file that holds it (not both)."""
        self.note(key, "secret (or " + key + "_file)", None)
        inline = self.raw(key, None)
        file_key = f"{key}_file"
        filename = self.raw(file_key, None)
        if inline is not None and filename is not None:
            self.problem(key, f"give either {key} or {file_key}, not both")
            return None
        if filename is not None:
            if not isinstance(filename, str):
                self.problem(file_key, f"expected a file name, got {_kind(filename)}")
                return None
            try:
                return Secret(Path(filename).read_text().strip())
            except OSError as exc:
                self.problem(file_key, f"cannot read {filename}: {exc.strerror or exc}")
                return None
        if inline is not None:
            if isinstance(inline, bool) or not isinstance(inline, (str, int)):
                self.problem(key, f"expected a string, got {_kind(inline)}")
                return None
            return Secret(str(inline))
        if required:
            self.problem(key, f"is required (or {file_key})")
        return None

    def section(self, key: str, required: bool = False) -> "Section":
        data = self.raw(key, MISSING if required else {})
        return Section(data, _join(self._path, key), self._ctx)

    def sections(self, key: str) -> list["Section"]:
        """A list of mappings; a single mapping is taken as a list of one."""
        data = self.raw(key, [])
        if isinstance(data, dict):
            return [Section(data, _join(self._path, key), self._ctx)]
        if not isinstance(data, list):
            self.problem(key, f"expected a list of mappings, got {_kind(data)}")
            return []
        return [Section(item, _join(_join(self._path, key), i), self._ctx) for i, item in enumerate(data)]

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key of a free-form mapping (marks them all as read)."""
        for key, value in self._data.items():
            self._seen.add(key)
            yield key, value

    def done(self) -> None:
        for key in self._data:
            if key not in self._seen:
                self.problem(key, "unknown key")


def _check_range(v: float, minimum: float | None, maximum: float | None, unit: str = "") -> None:
    if minimum is not None and v < minimum:
        raise ValueError(f"{v:g}{unit} is below the minimum {minimum:g}{unit}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{v:g}{unit} is above the maximum {maximum:g}{unit}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def config_keys(text: str, build: Callable[[Section], Any]) -> list[tuple[str, str, Any]]:
    """Every key ``build`` reads when given ``text``, as (path, kind, default), in reading order."""
    data, ctx = _compose(text, "reference", {})
    ctx.notes = []
    build(Section(data, "", ctx))
    seen, out = set(), []
    for path, kind, default in ctx.notes:
        if path not in seen:
            seen.add(path)
            out.append((path, kind, default))
    return out


def read_config(text: str, build: Callable[[Section], Any], source: str = "config",
                environ: dict[str, str] | None = None) -> Any:
    """Parse ``text`` and hand its root Section to ``build``; ConfigError lists every problem."""
    data, ctx = _compose(text, source, dict(os.environ) if environ is None else environ)
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    root = Section(data, "", ctx)
    result = build(root)
    if ctx.problems:
        raise ConfigError(ctx.problems, source)
    return result


def load_config_file(filename: str | os.PathLike[str], build: Callable[[Section], Any],
                     environ: dict[str, str] | None = None) -> Any:
    try:
        text = Path(filename).read_text()
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {filename}: {exc.strerror or exc}")], str(filename)) from None
    return read_config(text, build, str(filename), environ)
