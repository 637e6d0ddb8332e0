"""Copies one algorithm file's shared sections into every other algorithm file that holds them.

The algorithm files are single files on purpose, so the sections they share (marked `# ==== BEGIN SHARED: name
====` ... `# ==== END SHARED: name ====`) are copies; tests/test_single_file.py fails when two copies differ.
Edit a section in one file, then:

    python tools/sync_shared.py algorithms/iql.py            # writes its sections into the other files
    python tools/sync_shared.py algorithms/iql.py --check    # says what differs, writes nothing

Only the section bodies change; a file that lacks a section is left without it.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^# ==== BEGIN SHARED: (.+?) ====\n(.*?)^# ==== END SHARED: \1 ====$", re.M | re.S)


def sections(text: str) -> Dict[str, str]:
    return {name: body for name, body in SECTION.findall(text)}


def with_sections(text: str, replacements: Dict[str, str]) -> str:
    """`text` with the body of each section named in `replacements` replaced."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        body = replacements.get(name, match.group(2))
        return f"# ==== BEGIN SHARED: {name} ====\n{body}# ==== END SHARED: {name} ===="

    return SECTION.sub(replace, text)


def sync(source: Path, targets: List[Path], check: bool) -> List[str]:
    """The (file, section) pairs that differ from `source`; written unless `check`."""
    shared = sections(source.read_text())
    differing = []
    for target in targets:
        text = target.read_text()
        own = sections(text)
        changed = {name: body for name, body in shared.items() if name in own and own[name] != body}
        differing += [f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: {name}"
                      for name in sorted(changed)]
        if changed and not check:
            target.write_text(with_sections(text, changed))
    return differing


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the algorithm file whose sections are right")
    parser.add_argument("--check", action="store_true", help="list the sections that differ, write nothing")
    parser.add_argument("--folder", default=str(ROOT / "algorithms"), help="where the other algorithm files are")
    args = parser.parse_args(argv)
    source = Path(args.source).resolve()
    if not source.is_file() or not sections(source.read_text()):
        print(f"error: {args.source} is not an algorithm file with shared sections", file=sys.stderr)
        return 2
    targets = sorted(path for path in Path(args.folder).resolve().glob("*.py") if path != source)
    differing = sync(source, targets, args.check)
    for line in differing:
        print(("differs: " if args.check else "updated: ") + line)
    if not differing:
        print(f"every shared section matches {args.source}")
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
