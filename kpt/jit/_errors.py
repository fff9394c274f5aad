"""Build errors that say what failed, in a few lines, and where the full log is.

A failed nvcc/hipcc/ninja run prints hundreds of lines (every command line, every template
instantiation note); the user needs the first diagnostic, the log path and what to do next.
"""

from __future__ import annotations

import re
from pathlib import Path

# gcc/clang "file:3:5: error: ...", nvcc "file(3): error: ...", "fatal error: ...",
# ptxas "ptxas error   : ...", MSVC-style "error C2065: ...", and link/load failures, which
# carry no "error:" of their own.
_ERROR_LINE = re.compile(
    r"\berror\b(\s+[A-Z]*\d+)?\s*:|undefined reference to|undefined symbol", re.IGNORECASE
)
# Lines that follow a diagnostic and belong to it: gcc/clang echo the source line and a caret
# (indented), nvcc adds "detected during ..." notes (indented).
_CONTEXT_LINE = re.compile(r"^\s+\S")
_MAX_CONTEXT = 3
_TAIL_LINES = 8


class BuildError(RuntimeError):
    """A JIT build or a compile check failed, or cannot be attempted here.

    The message names the extension, shows the first compiler error (not the whole log),
    the path of the full log and a hint; dispatch turns it into an *unavailable* reason.
    ``first_error`` (one line) and ``log_path`` are set when a compiler ran and failed.
    """

    def __init__(
        self, message: str, *, first_error: str | None = None, log_path: Path | None = None
    ) -> None:
        super().__init__(message)
        self.first_error = first_error
        self.log_path = log_path


class CompilerMissing(BuildError, FileNotFoundError):
    """The compiler a build needs (nvcc, hipcc, c++) is not installed or not found.

    Also a FileNotFoundError, so callers that treat "tool missing" generically catch it.
    """


def first_errors(log: str) -> str:
    """The first error line of a compiler log with its context lines, plus a count of the rest.

    Falls back to the last lines of the log when no line looks like a diagnostic (a crash, a
    killed compiler, an import failure).
    """
    lines = log.splitlines()
    hits = [i for i, line in enumerate(lines) if _ERROR_LINE.search(line)]
    if not hits:
        tail = [line for line in lines if line.strip()][-_TAIL_LINES:]
        return "\n".join(tail) if tail else "(the compiler printed nothing)"
    first = hits[0]
    shown = [lines[first].strip()]
    for line in lines[first + 1 : first + 1 + _MAX_CONTEXT]:
        if not _CONTEXT_LINE.match(line) or _ERROR_LINE.search(line):
            break
        shown.append(line.rstrip())
    more = len(hits) - 1
    if more:
        shown.append(f"... and {more} more error line(s) in the log")
    return "\n".join(shown)


def build_error(
    what: str, log: str, log_path: Path | None, hint: str, cls: type[BuildError] = BuildError
) -> BuildError:
    """A BuildError whose message is ``what``, the first errors of ``log``, log path, hint."""
    shown = first_errors(log) if log.strip() else ""
    parts = [what, _indent(shown)] if shown else [what]
    if log_path is not None:
        parts.append(f"full log: {log_path}")
    parts.append(f"hint: {hint}")
    first = shown.splitlines()[0] if shown else None
    return cls("\n".join(parts), first_error=first, log_path=log_path)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
