"""`selftune kb add|ls|rm|search`: knowledge bases of the user's own documents."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from selftune.args import KbArgs, parse_args
from selftune.errors import SelftuneError, UsageError

ARGS = KbArgs
# sub-verb -> the positional arguments it takes before its flags
SUBVERBS = {
    "add": "NAME PATH...",
    "ls": "",
    "rm": "NAME",
    "search": "NAME QUERY",
    "eval": "NAME",
}


@dataclass
class KbCommand:
    subverb: str
    positionals: list[str]
    flags: KbArgs = field(default_factory=KbArgs)


def parse(argv: list[str], prog: str) -> KbCommand:
    """`kb SUBVERB POSITIONALS... [--flags]`."""
    usage = "; ".join(f"{prog} {verb} {what}".rstrip() for verb, what in SUBVERBS.items())
    if not argv or argv[0] not in SUBVERBS:
        raise UsageError(f"usage: {usage}")
    subverb, rest = argv[0], argv[1:]
    split = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    positionals, flags = rest[:split], rest[split:]
    wanted = SUBVERBS[subverb].split()
    variadic = wanted[-1:] == ["PATH..."] or wanted[-1:] == ["QUERY"]
    if len(positionals) < len(wanted) or (not variadic and len(positionals) > len(wanted)):
        raise UsageError(f"usage: {prog} {subverb} {SUBVERBS[subverb]}".rstrip())
    return KbCommand(subverb, positionals, parse_args(KbArgs, flags, f"{prog} {subverb}"))


def run(command: KbCommand) -> int:
    from selftune.kb.index import index_path

    if command.subverb == "ls":
        return list_kbs()
    name = command.positionals[0]
    path = index_path(name)
    if command.subverb == "rm":
        from selftune.kb.index import remove_index

        remove_index(path)
        print(f"removed {path}")
        return 0
    if command.subverb == "add":
        return add(path, [Path(p) for p in command.positionals[1:]], command.flags)
    if command.subverb == "eval":
        return evaluate(name, command.flags)
    return search(name, " ".join(command.positionals[1:]), command.flags)


def evaluate(name: str, flags: KbArgs) -> int:
    """Retrieval figures of the knowledge base on a question set (the shipped one by default)."""
    from selftune.atomic import write_json_atomic
    from selftune.kb.evaluate import as_json, load_questions, retrieval_report, table
    from selftune.kb.retrieve import open_kb

    questions = load_questions(Path(flags.qa) if flags.qa else None)
    kb = open_kb(name, flags.embedder)
    try:
        report = retrieval_report(kb, questions, flags.top_k)
    finally:
        kb.close()
    print(table(report))
    if flags.output:
        write_json_atomic(Path(flags.output), as_json(report))
    return 0


def add(path: Path, paths: list[Path], flags: KbArgs) -> int:
    from selftune.kb.embed import load_embedder
    from selftune.kb.index import add_files
    from selftune.kb.parse import collect_files

    files, problems = collect_files(paths)
    for problem in problems:
        print(f"selftune: error: {problem}", file=sys.stderr)
    if not files and not flags.prune:
        raise SelftuneError("nothing to index: no .md, .txt, .html, .pdf or .docx file given")
    prune_under = [p for p in paths if p.is_dir()] if flags.prune else None
    report = add_files(path, files, load_embedder(flags.embedder), prune_under)
    for failure in report.failed:
        print(f"selftune: error: {failure}", file=sys.stderr)
    print(
        f"{path}: {len(report.added)} added, {len(report.replaced)} replaced, "
        f"{len(report.unchanged)} unchanged, {len(report.removed)} removed, "
        f"{len(report.failed) + len(problems)} failed; {report.chunks} new chunks"
    )
    return 1 if report.failed or problems else 0


def list_kbs() -> int:
    from selftune.kb.index import list_indexes

    found = list_indexes()
    if not found:
        print("no knowledge bases yet (selftune kb add NAME FILES...)")
    for each in found:
        name = each.path.name.removesuffix(".sqlite")
        print(
            f"{name}\t{each.documents} documents\t{each.chunks} chunks\t{each.embedder}\t{each.path}"
        )
    return 0


def search(name: str, query: str, flags: KbArgs) -> int:
    from selftune.kb.retrieve import open_kb

    kb = open_kb(name, flags.embedder)
    try:
        hits = kb.search(query, flags.top_k)
    finally:
        kb.close()
    if flags.json:
        print(json.dumps([h.as_source() for h in hits], ensure_ascii=False, indent=1))
        return 0
    for hit in hits:
        where = f"{hit.path}" + (f" p.{hit.page}" if hit.page else "")
        print(f"[{hit.rank}] {hit.score:.4f} (cos {hit.similarity:.3f}) {where} :: {hit.heading}")
        print("    " + hit.text.replace("\n", "\n    "))
    return 0
