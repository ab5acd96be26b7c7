"""Policy files as YAML with positions: PyYAML composed into nodes and walked by hand.

Split from :mod:`snapcore.policy` so that a checkpoint without a policy file never
imports PyYAML (~7 ms of the CLI's start). The walk counts nodes and depth (alias
bombs), refuses duplicate keys, merge keys and tags, and remembers each key's line.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from snapcore.errors import PolicyError
from snapcore.policy.model import MAX_DEPTH, MAX_NODES, MAX_POLICY_BYTES, YMap, YSeq, short

_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"


@dataclass(slots=True)
class _Walker:
    file: str
    constructor: yaml.SafeLoader
    visited: int = 0
    #: The collections being walked, by id: an alias back to one of them is a cycle.
    path: list[int] = field(default_factory=list)

    def value(self, node: yaml.Node) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise PolicyError(
                f"more than {MAX_NODES} YAML nodes (an alias bomb?): a policy is small",
                file=self.file,
                line=node.start_mark.line + 1,
            )
        if isinstance(node, yaml.CollectionNode):
            # aliases make a graph of the tree: it may loop (&a [*a]) or chain deeper
            # than the composer's own limit, and this walk recurses
            if id(node) in self.path:
                raise PolicyError(
                    "an alias refers to a node that contains it (a recursive structure)",
                    file=self.file,
                    line=node.start_mark.line + 1,
                )
            if len(self.path) >= MAX_DEPTH:
                raise PolicyError(
                    f"nested deeper than {MAX_DEPTH} levels (through aliases): a policy is shallow",
                    file=self.file,
                    line=node.start_mark.line + 1,
                )
            self.path.append(id(node))
            try:
                return self._collection(node)
            finally:
                self.path.pop()
        try:
            return self.constructor.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            raise PolicyError(f"bad value: {_one_line(exc)}", file=self.file, line=node.start_mark.line + 1) from None
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, yaml.YAMLError):
            # PyYAML's scalar constructors fail with whatever int(), float(), datetime()
            # or a dict lookup raise on a malformed value: !!int x, 0x_, 2024-13-45
            raise PolicyError(
                f"bad value {short(node.value)} for its type ({node.tag.rsplit(':', 1)[-1]})",
                file=self.file,
                line=node.start_mark.line + 1,
            ) from None

    def _collection(self, node: yaml.CollectionNode) -> Any:
        if node.tag not in (_MAP, _SEQ):
            # walked by hand, a tagged collection would silently lose its tag
            # (!!set, !!omap, !!python/object/apply:...): a policy has no use for one
            raise PolicyError(
                f"YAML tag {node.tag!r} is not supported: a policy holds plain mappings and lists",
                file=self.file,
                line=node.start_mark.line + 1,
            )
        if isinstance(node, yaml.MappingNode):
            result = YMap()
            result.line = node.start_mark.line + 1
            result.lines = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise PolicyError("YAML merge keys (<<) are not supported", file=self.file, line=line)
                key = self.value(key_node)
                if not isinstance(key, str):
                    raise PolicyError(f"keys must be strings, got {short(key)}", file=self.file, line=line)
                if key in result:
                    raise PolicyError(
                        f"duplicate key {short(key)} (first at line {result.lines[key]})", file=self.file, line=line
                    )
                result.lines[key] = line
                result[key] = self.value(value_node)
            return result
        if isinstance(node, yaml.SequenceNode):
            seq = YSeq(self.value(item) for item in node.value)
            seq.line = node.start_mark.line + 1
            return seq
        raise AssertionError(f"not a collection node: {node!r}")  # pragma: no cover


class _TooBig(yaml.YAMLError):
    def __init__(self, message: str, mark: yaml.Mark) -> None:
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: its composer recurses once per level of
    nesting (``[[[[...`` would raise RecursionError) and builds every node of a large
    document before our walker could count them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES} YAML nodes: a policy is small", self._mark())
        if self._depth >= MAX_DEPTH:
            raise _TooBig(f"nested deeper than {MAX_DEPTH} levels: a policy is shallow", self._mark())
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _mark(self) -> yaml.Mark:
        mark: yaml.Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        return mark


def _one_line(exc: yaml.MarkedYAMLError) -> str:
    """The problem of a PyYAML error without the source excerpt str() adds."""
    mark = exc.problem_mark or exc.context_mark
    text = exc.problem or exc.context or type(exc).__name__
    if exc.problem and exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        text += f" ({exc.context} that starts on line {exc.context_mark.line + 1})"
    return " ".join(text.split())


def read_policy_file(name: str) -> tuple[bytes, int]:
    """The bytes of the policy file ``name`` (at most ``MAX_POLICY_BYTES`` + 1) and its
    size. Opened once, without following a symlink and without blocking (a FIFO in
    its place would hang every command); what is checked (a regular file, who may
    write it) is checked on that descriptor, so nothing can be swapped in between."""
    from snapcore.policy.parse import check_trusted

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PolicyError("no such file", file=name) from None
    except PermissionError:
        raise PolicyError("permission denied", file=name) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PolicyError(
                "is a symbolic link: give the file it points to (a policy is never read through a link)", file=name
            ) from None
        raise PolicyError(f"cannot read: {exc.strerror or exc}", file=name) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PolicyError("is a directory, not a policy file", file=name)
        raise PolicyError("is not a regular file (a FIFO, device or socket): refusing it", file=name)
    with os.fdopen(fd, "rb") as f:
        check_trusted(name, st)
        try:
            return f.read(MAX_POLICY_BYTES + 1), st.st_size  # never more, whatever the file's size
        except OSError as exc:
            raise PolicyError(f"cannot read: {exc.strerror or exc}", file=name) from None


def load_yaml(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Read and parse a policy file; returns the walked document and its text."""
    name = os.fspath(path)
    raw, size = read_policy_file(name)
    if len(raw) > MAX_POLICY_BYTES:
        # the line where the limit falls, so that the message has a line like every other
        line = raw[:MAX_POLICY_BYTES].count(b"\n") + 1
        raise PolicyError(
            f"{max(size, len(raw))} bytes: a policy is at most {MAX_POLICY_BYTES} bytes (line {line} passes it)",
            file=name,
            line=line,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PolicyError(f"not UTF-8 text (byte {exc.start})", file=name, line=line) from None
    loader: _Loader | None = None  # as yaml.compose, but its line is there for an error without a mark
    try:
        loader = _Loader(text)  # which reads the text for control characters already
        node = loader.get_single_node()
    except _TooBig as exc:
        raise PolicyError(exc.message, file=name, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        bad_line = mark.line + 1 if mark else None
        raise PolicyError(f"YAML syntax error: {_one_line(exc)}", file=name, line=bad_line) from None
    except yaml.reader.ReaderError as exc:
        # a control character; PyYAML gives a position in the text, not a line
        line = text[: exc.position].count("\n") + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise PolicyError(f"character {char} is not allowed in YAML: {exc.reason}", file=name, line=line) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"YAML error: {' '.join(str(exc).split())}", file=name) from None
    except (ValueError, OverflowError) as exc:
        # PyYAML's scanner lets some bad escapes through as bare errors: "\U00110000"
        # (past the last code point) raises chr()'s ValueError (found by the fuzz test)
        raise PolicyError(
            f"YAML error: {' '.join(str(exc).split())} (a bad escape in a quoted string?)",
            file=name,
            line=loader.line + 1 if loader is not None else 1,
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None, text
    walker = _Walker(file=name, constructor=yaml.SafeLoader(""))
    return walker.value(node), text
