"""``kpt-autotune``: tune a model's shapes, and inspect or move the autotune database.

    kpt-autotune warmup --model path/to/config.json [--tokens 1,16,128] [--dtype bf16] [--op OP]
    kpt-autotune warmup --op rmsnorm_qkv_rope --shapes shapes.json
    kpt-autotune show [--op OP] [--all]      winners for this GPU, or every shipped and stored row
    kpt-autotune export FILE | import FILE   JSON Lines (``-`` for stdout/stdin)
    kpt-autotune export --ship [FOLDER]      this GPU's rows as the file kpt ships for it
    kpt-autotune clear [--op OP] [--yes]
    kpt-autotune doctor                      which backends work here, and why not

Every error is one line on stderr, ``kpt-autotune COMMAND: error: ...``, and a non-zero exit:
2 for bad input (arguments, an import file), 3 when the database or a file cannot be read or
written, 4 for anything unexpected (``-v`` shows its traceback); 1 when ``clear`` is declined.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kpt._table import format_table

NO_DEVICE = "no CUDA/ROCm device: nothing to tune; kpt uses static priorities on this machine"
DEFAULT_TOKENS = [1 << i for i in range(14)]  # every power-of-two bucket from 1 to 8192
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


class UsageError(Exception):
    """Bad input on the command line; printed without a traceback."""


class Failure(Exception):
    """A command that could not do all it was asked (exit status 3); printed as one line."""


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _choice(backend: str | None, config: Any) -> str:
    if backend is None:
        return "(none valid)"
    text = config if isinstance(config, str) else json.dumps(config, sort_keys=True)
    return backend if text == "{}" else f"{backend} {text}"


# ---- inputs --------------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict:
    """A HF ``config.json`` (file or directory holding one) as a dict; multimodal configs give
    their ``text_config``, the part that describes the decoder layers kpt tunes."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read model config {path}: {err}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    text = config.get("text_config")
    if "hidden_size" not in config and isinstance(text, dict):
        config = {**config, **text}
    return config


def _read_shapes(value: str) -> list[dict]:
    source = Path(value)
    text = source.read_text(encoding="utf-8") if source.is_file() else value
    try:
        shapes = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--shapes is neither a JSON file nor JSON ({err})") from None
    shapes = [shapes] if isinstance(shapes, dict) else shapes
    if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
        raise UsageError("--shapes must be a JSON object or a list of objects")
    return shapes


def _parse_tokens(value: str) -> list[int]:
    try:
        tokens = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {value!r}") from None
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError("token counts must be positive")
    return tokens


def _dtype(name: str) -> Any:
    import torch

    canonical = _DTYPES.get(str(name).lower().removeprefix("torch."))
    if canonical is None:
        raise UsageError(f"unknown dtype {name!r} (one of {', '.join(sorted(_DTYPES))})")
    return getattr(torch, canonical)


def _tunable_ops(names: list[str] | None) -> dict:
    from kpt.ops._registry import all_ops

    ops = {name: op for name, op in sorted(all_ops().items()) if op.tuning is not None}
    if not names:
        return ops
    unknown = [n for n in names if n not in ops]
    if unknown:
        raise UsageError(f"unknown or untunable op(s) {unknown}; tunable: {sorted(ops)}")
    return {n: ops[n] for n in names}


# ---- commands ------------------------------------------------------------------------------


def _warmup(args: argparse.Namespace) -> int:
    import torch

    from kpt.autotune.tuner import tune

    ops = _tunable_ops(args.op)
    config: dict = {}
    if args.shapes is not None:
        if not args.op or len(ops) != 1:
            raise UsageError("--shapes describes one op's calls: name that op with --op")
        plan = {name: _read_shapes(args.shapes) for name in ops}
    elif args.model is not None:
        config = read_hf_config(args.model)
        plan = {}
        for name, op in ops.items():
            try:
                plan[name] = op.tuning.shapes(config, args.tokens)
            except (KeyError, TypeError, ValueError) as err:
                logging.getLogger("kpt").warning("%s: no shapes from this config (%s)", name, err)
    else:
        raise UsageError("warmup needs --model or --shapes")
    dtype = _dtype(args.dtype or config.get("torch_dtype") or config.get("dtype") or "bf16")
    if not torch.cuda.is_available():
        print(NO_DEVICE)
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    results = []
    for name, shapes in plan.items():
        results += tune(ops[name], shapes, dtype, device, warmup_ms=args.warmup_ms,
                        rep_ms=args.rep_ms, progress=not args.quiet)
    rows = [(r.op, r.bucket, _choice(r.backend, r.config), _us(r.time_us), _us(r.default_us),
             _speedup(r.speedup), len(r.invalid)) for r in results]
    print(format_table(rows, ["op", "bucket", "chosen", "time us", "default us", "speedup",
                              "invalid"]))
    return 0


def _status(row: dict) -> str:
    from kpt.autotune import provenance

    reason = provenance.stale_reason(row)
    if reason:
        return "stale: " + reason
    return "ok" if row["valid"] else f"invalid: {row['error']}"


def _show(args: argparse.Namespace) -> int:
    from kpt.autotune import db, effective_rows, provenance, winner
    from kpt.ops._registry import all_ops

    if args.all:
        # Reads only: a missing database is no rows, not a new file.
        listed = [("shipped", r) for r in db.shipped_rows() if args.op in (None, r["op"])]
        listed += [("database", r) for r in db.stored_rows(op=args.op)]
        table = [(where, r["fingerprint"], r["op"], r["dtype"], r["bucket"],
                  _choice(r["backend"], r["config"]), _us(r["median_us"]),
                  "-" if r["spread"] is None else f"{100 * r['spread']:.1f}%", r["samples"],
                  _status(r)) for where, r in listed]
        print(format_table(table, ["from", "fingerprint", "op", "dtype", "bucket", "candidate",
                                   "median us", "spread", "n", "status"]))
        return 0
    fingerprint = args.fingerprint or provenance.device_fingerprint()
    if fingerprint is None:
        print("no CUDA/ROCm device here: pass --all to list every row, or --fingerprint")
        return 0
    priorities = {name: op.priority.get("cuda", ()) for name, op in all_ops().items()}
    picks = winner.winners(effective_rows(fingerprint), priorities)
    table = [(op, dtype, bucket, _choice(p.winner["backend"], p.winner["config"]),
              _us(p.winner["median_us"]), _us(p.default_us), _speedup(p.speedup))
             for (op, dtype, bucket, _), p in picks.items() if args.op in (None, op)]
    print(f"fingerprint: {fingerprint}")
    if not table:
        print("no trusted tuned choices (`show --all` lists stale and invalid rows too)")
        return 0
    print(format_table(table, ["op", "dtype", "bucket", "chosen", "time us", "default us",
                               "speedup"]))
    return 0


def _dump(rows: list[dict], file: str | Path) -> int:
    """:func:`~kpt.autotune.db.dump_rows`, a file that cannot be written a :class:`Failure`."""
    from kpt.autotune import db

    try:
        return db.dump_rows(rows, file)
    except OSError as err:
        raise Failure(f"cannot write {file}: {err.strerror or err}") from None


def _export(args: argparse.Namespace) -> int:
    from kpt.autotune import db

    if args.ship:
        return _ship(args)
    if args.fingerprint:
        raise UsageError("--fingerprint goes with --ship")
    if args.file is None:
        raise UsageError("name the output FILE (or - for stdout), or pass --ship")
    # A database that is there but cannot be read raises (DatabaseUnavailable): "exported 0
    # rows" is said only when there are none.
    stored = db.read_stored(op=args.op)
    count = _dump(stored.rows, args.file)
    where = f"from {stored.source} " if stored.exists else ""
    note = "" if stored.exists else f" ({stored.source})"
    print(f"exported {count} rows {where}to {args.file}{note}",
          file=sys.stderr if args.file == "-" else None)
    if stored.left_out:
        raise Failure(f"{len(stored.left_out)} stored rows are not valid rows and were not "
                      f"exported, e.g. {stored.left_out[0]}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    """This GPU's rows (shipped ones overlaid by the database's) whose kernels are unchanged,
    written as ``<folder>/<gpu>.jsonl``: the file to commit under ``kpt/autotune/tuned/``."""
    from kpt.autotune import db, provenance
    from kpt.ops._registry import all_ops

    if args.op:
        raise UsageError("--ship writes every op's rows of the GPU (its file is replaced)")
    fingerprint = args.fingerprint or provenance.device_fingerprint()
    if fingerprint is None:
        raise UsageError("no CUDA/ROCm device here: pass --fingerprint (`show --all` lists them)")
    ops = all_ops()
    stored = db.read_stored(fingerprint=fingerprint)  # unreadable: an error, not "no rows"
    if stored.left_out:
        raise Failure(f"{len(stored.left_out)} stored rows of {fingerprint} are not valid rows, "
                      f"e.g. {stored.left_out[0]}")
    rows, left_out = [], 0
    for row in db.overlay(db.shipped_rows(fingerprint), stored.rows):
        if row["op"] in ops and row["source_hash"] == provenance.source_hash(row["op"],
                                                                              row["backend"]):
            rows.append(row)
        else:
            left_out += 1
    if not rows:
        raise UsageError(f"no rows of {fingerprint} to ship: run `kpt-autotune warmup` first")
    folder = Path(args.file) if args.file is not None else db.SHIPPED_DIR
    if not folder.is_dir():
        raise UsageError(f"--ship writes into a folder: {folder} is not one")
    target = folder / db.shipped_file_name(fingerprint)
    count = _dump(rows, target)
    print(f"wrote {count} rows of {fingerprint} to {target}"
          + (f" ({left_out} rows of changed kernels or removed ops left out)" if left_out else ""))
    return 0


def _import(args: argparse.Namespace) -> int:
    from kpt.autotune import db, invalidate

    try:
        rows = db.load_rows(args.file)
    except OSError as err:
        raise UsageError(f"cannot read {args.file}: {err}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    with db.ResultsDB.open() as database:
        count = database.write(rows)
    invalidate()
    print(f"imported {count} rows into {database.describe()}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from kpt.autotune import db, invalidate

    if not db.default_path().exists():
        print(f"deleted 0 rows (no database at {db.default_path()})")
        return 0
    with db.ResultsDB.open() as database:
        found, invalid = database.read_rows(op=args.op)
        count = len(found) + len(invalid)  # what delete() removes, invalid rows included
        what = f"{count} rows" + (f" of {args.op}" if args.op else "")
        if count and not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"would delete {what} from {database.path}: pass --yes")
            if input(f"delete {what} from {database.path}? [y/N] ").strip().lower() != "y":
                print("nothing deleted")
                return 1
        deleted = database.delete(op=args.op)
    invalidate()
    print(f"deleted {deleted} rows")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from kpt.autotune import db
    from kpt.autotune.doctor import backend_table, environment

    lines = environment()
    if not db.default_path().exists():
        lines.append(("rows stored", "none (no database yet)"))  # doctor creates nothing
    else:
        try:
            with db.ResultsDB.open(readonly=True) as database:
                lines.append(("rows stored", f"{database.count()} ({database.describe()})"))
        except db.DatabaseUnavailable as err:
            lines.append(("rows stored", f"database unavailable: {err}"))
    print(format_table(lines))
    print()
    print(format_table(backend_table(), ["op", "backend", "status"]))
    return 0


# ---- entry point ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpt-autotune",
        description="Tune kpt ops for this GPU, and inspect or move the autotune database.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every invalid config")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        heading = summary[0].upper() + summary[1:]
        return sub.add_parser(name, help=summary, description=f"{heading}.\n\n{description}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    warm = command(
        "warmup", "tune every shape a model (or a shape list) runs",
        "Measures every backend and config of each tunable op on those shapes on this GPU,\n"
        "checks each against the reference, and stores the times in the database; dispatch\n"
        "then uses the winners. Without a CUDA/ROCm device there is nothing to tune.\n"
        "Example: kpt-autotune warmup --model path/to/config.json --tokens 1,16,128")
    source = warm.add_mutually_exclusive_group()
    source.add_argument("--model", help="HF config.json, or a directory holding one")
    source.add_argument("--shapes", help="JSON list of shape dicts, or a file holding one")
    warm.add_argument("--op", action="append", help="op to tune (repeatable; default: all)")
    warm.add_argument("--tokens", type=_parse_tokens, default=DEFAULT_TOKENS,
                      help="token counts, comma-separated (default: powers of two 1..8192)")
    warm.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the config's, else bf16)")
    warm.add_argument("--warmup-ms", type=float, default=25.0,
                      help="time each candidate runs before it is measured (default: 25)")
    warm.add_argument("--rep-ms", type=float, default=100.0,
                      help="time each candidate is measured for (default: 100)")
    warm.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    warm.set_defaults(func=_warmup)

    show = command(
        "show", "tuned winners for this GPU, or every row with --all",
        "Without --all: the choice dispatch makes per op, dtype and shape bucket on this GPU\n"
        "(rows shipped with kpt overlaid by the database's), with the untuned default's time.\n"
        "With --all: every shipped and stored row, of every GPU, and whether it is trusted\n"
        "(a row measured on another kernel source or compiler version is stale). Reads only:\n"
        "a missing database is not created.")
    show.add_argument("--op", help="only this op")
    show.add_argument("--all", action="store_true", help="every row, all fingerprints")
    show.add_argument("--fingerprint", help="winners for another GPU's fingerprint")
    show.set_defaults(func=_show)

    export = command(
        "export", "write the database's rows as JSON Lines",
        "FILE gets every row of the database (- for stdout), for `kpt-autotune import`\n"
        "elsewhere. With --ship: this GPU's trusted rows (shipped ones overlaid by the\n"
        "database's; rows whose kernel sources changed since they were measured left out)\n"
        "go to FOLDER/<gpu>.jsonl, default kpt/autotune/tuned/, the rows kpt ships for it:\n"
        "    kpt-autotune warmup --model bench/llama3-8b-config.json --tokens 1,16,128,4096 \\\n"
        "        && kpt-autotune export --ship\n"
        "Reads only; a database in a read-only location is read in place. A database that is\n"
        "there but cannot be read is an error, never \"exported 0 rows\".")
    export.add_argument("file", nargs="?", metavar="FILE|FOLDER",
                        help="output file, - for stdout; with --ship, a folder")
    export.add_argument("--op", help="only this op's rows")
    export.add_argument("--ship", action="store_true",
                        help="this GPU's trusted rows as FOLDER/<gpu>.jsonl")
    export.add_argument("--fingerprint", help="with --ship: another GPU's rows (after import)")
    export.set_defaults(func=_export)

    imp = command(
        "import", "add rows from JSON Lines or a JSON array",
        "Creates the database if needed; an imported row replaces the stored row of the same\n"
        "key (op, backend, config, dtype, bucket, fingerprint). Every field of every row is\n"
        "checked first (a time must be a finite positive number): one bad row, named by its\n"
        "line and field, and nothing is imported.")
    imp.add_argument("file", help="input file, or - for stdin")
    imp.set_defaults(func=_import)

    clear = command(
        "clear", "delete stored rows",
        "Deletes the database's rows (all, or one op's); rows shipped with kpt stay.\n"
        "Asks first unless --yes.")
    clear.add_argument("--op", help="only this op's rows")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(func=_clear)

    doctor = command(
        "doctor", "backends available here, fingerprint, versions",
        "The device, its fingerprint (what tuned rows are keyed by), the database, the\n"
        "toolchain versions, and for every op and backend whether it runs here and why not.\n"
        "Creates nothing.")
    doctor.set_defaults(func=_doctor)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kpt-autotune``; returns the exit status: 0 ok, 1 declined, 2 bad input, 3 the
    database or a file could not be read or written, 4 an unexpected error. Errors are one
    line on stderr; ``-v`` adds the traceback of an unexpected one."""
    import sqlite3

    from kpt.autotune import db

    args = _parser().parse_args(argv)
    log = logging.getLogger("kpt")
    if not log.handlers and not logging.getLogger().handlers:
        # Only when nobody configured logging: an embedding program keeps its own setup.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kpt-autotune: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    def error(message: object, status: int) -> int:
        print(f"kpt-autotune {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return status

    try:
        return args.func(args)
    except UsageError as err:
        return error(err, 2)
    except (Failure, db.DatabaseUnavailable, OSError, sqlite3.Error) as err:
        return error(err, 3)
    except KeyboardInterrupt:
        return error("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - one line, not a traceback, unless asked (-v)
        if args.verbose:
            traceback.print_exc()
        return error(f"unexpected {type(err).__name__}: {err} (-v shows the traceback)", 4)


if __name__ == "__main__":
    sys.exit(main())
