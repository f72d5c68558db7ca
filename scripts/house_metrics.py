"""The shape of the house in numbers, as the one-house issue measures it: lines of src/gqa, functions over 60
lines, calls with more than 6 positional arguments, and the places that ask which model kind a thing is.

    python scripts/house_metrics.py            # a summary
    python scripts/house_metrics.py --list     # and every offender
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gqa"
KERNELS = {"kernels/decode.py"}  # the Triton kernel is exempt from the function length rule
# a model-kind question: the name of the predicate, the type test, or a branch on a flag named for the kind
KIND = re.compile(r"is_seq2seq\w*\(|isinstance\([^)]*Seq2Seq\w*\)|isinstance\((batch|blocks), tuple\)|"
                  r"\bif (not )?seq2seq\b|\bseq2seq else\b|\bif seq2seq_|\.is_encoder_decoder\b")


def long_functions(path: Path, tree: ast.AST) -> list[str]:
    return [f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60 and str(path.relative_to(SRC)) not in KERNELS]


def positional_calls(path: Path, tree: ast.AST, limit: int = 6) -> list[str]:
    return [f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node.func)} ({len(node.args)} positional)"
            for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) > limit]


def kind_branches(path: Path) -> list[str]:
    if path.name == "kinds.py":  # the one place that is asked
        return []
    return [f"{path.relative_to(SRC)}:{i} {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if KIND.search(line) and not line.lstrip().startswith(("def ", "#", "from ", "import "))]


def imports_between_rooms() -> set[tuple[str, str]]:
    """(room, room it imports from) for every relative import in src/gqa, function-level ones included; a room
    is a top-level module or package of gqa."""
    edges = set()
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - node.level + 1])
                targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
                edges |= {(parts[0], t[0]) for t in targets if t and t[0] != parts[0]}
    return edges


def room_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Groups of rooms that import each other, directly or round a circle (strongly connected, > 1 room)."""
    rooms = {a for e in edges for a in e}
    reach = {r: {b for a, b in edges if a == r} for r in rooms}
    changed = True
    while changed:
        changed = False
        for r in rooms:
            more = set().union(*(reach[x] for x in reach[r])) - reach[r]
            if more:
                reach[r] |= more
                changed = True
    groups = {frozenset({r} | {x for x in reach[r] if r in reach[x]}) for r in rooms}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--src", type=Path, default=None, help="another checkout's src/gqa (default: this one's)")
    args = parser.parse_args()
    global SRC
    SRC = (args.src or SRC).resolve()
    lines, found = 0, {"functions over 60 lines": [], "calls with > 6 positional arguments": [],
                       "model-kind questions": []}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines += len(text.splitlines())
        tree = ast.parse(text)
        found["functions over 60 lines"] += long_functions(path, tree)
        found["calls with > 6 positional arguments"] += positional_calls(path, tree)
        found["model-kind questions"] += kind_branches(path)
    print(f"src/gqa: {lines:,} lines")
    found["rooms importing each other"] = [" <-> ".join(c) for c in room_cycles(imports_between_rooms())]
    for name, items in found.items():
        print(f"{name}: {len(items)}")
        if args.list:
            print("".join(f"  {item}\n" for item in items), end="")


if __name__ == "__main__":
    main()
