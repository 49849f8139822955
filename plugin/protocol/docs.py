"""The tables of docs/protocol.md, written from the tensor table and the error codes.

    python -m plugin.protocol.docs           # rewrite the generated tables in docs/protocol.md
    python -m plugin.protocol.docs --check   # exit 1 if they differ from the table (tests do the same)

Each table sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`; the prose around it is
written by hand.
"""
from __future__ import annotations

import argparse
import re
import sys

from plugin.paths import REPO_ROOT
from plugin.protocol.errors import ErrorCode, EXTERNAL_SIGNATURES, tagged, UNREACHABLE_STATUSES
from plugin.protocol.tensors import TENSORS

PROTOCOL_DOC = REPO_ROOT / "docs" / "protocol.md"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *map(_row, rows)])


def tensors_table() -> str:
    rows = [[f"`{t.name}`", t.triton_dtype, "`[" + ", ".join(map(str, (1, *t.dims))) + "]`",
             ", ".join(f"`{m}`" for m in t.inputs_of) or "-", ", ".join(f"`{m}`" for m in t.outputs_of) or "-",
             t.meaning + (" (optional)" if t.optional else "")] for t in TENSORS.values()]
    return _table(["tensor", "dtype", "shape", "input of", "output of", "meaning"], rows)


def errors_table() -> str:
    example = tagged(ErrorCode.POSITION_GAP, "position gap: sequence 6 expects its next row at position 2, "
                                             "the request starts at 5")
    rows = [[f"`{c.name}`", f"{c.recovery.name}: {c.recovery.value}", c.meaning] for c in ErrorCode]
    return (f"As the edge receives it through the ensemble:\n\n    in ensemble 'ce_collm', {example}\n\n"
            + _table(["code", "recovery", "meaning"], rows))


def external_table() -> str:
    rows = [[f"`{s.words}`", f"`{s.code.name}`", s.whose] for s in EXTERNAL_SIGNATURES]
    rows.append([f"gRPC status {' or '.join(UNREACHABLE_STATUSES)}", f"`{ErrorCode.UNREACHABLE.name}`",
                 "the transport, when none of the above says otherwise"])
    return _table(["words in the message", "code", "whose words"], rows)


TABLES = {"tensors": tensors_table, "errors": errors_table, "external-errors": external_table}


def _section(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)


def render(text: str) -> str:
    """`text` with every generated table rewritten; a missing marker is an error, not a silent skip."""
    for name, table in TABLES.items():
        text, found = _section(name).subn(lambda m: m.group(1) + table() + "\n" + m.group(2), text)
        if found != 1:
            raise ValueError(f"docs/protocol.md needs exactly one '<!-- generated: {name} -->' ... "
                             f"'<!-- end: {name} -->' section, found {found}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the tables are stale")
    args = parser.parse_args(argv)
    text = PROTOCOL_DOC.read_text()
    fresh = render(text)
    if args.check:
        print("up to date" if fresh == text else f"{PROTOCOL_DOC} is stale: run python -m plugin.protocol.docs")
        return int(fresh != text)
    PROTOCOL_DOC.write_text(fresh)
    print(f"wrote {PROTOCOL_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
