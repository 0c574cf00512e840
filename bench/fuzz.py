"""The long fuzz run (issue 11): the fuzz suite with thousands of examples a test.

    python bench/fuzz.py [--examples 8000] [--others 3000] [--out PATH]

Runs ``tests/unit/test_fuzz_*.py`` under the Hypothesis profile ``long``
(``tests/unit/fuzzing.py``): the event decoders and the processors' handlers
with ``--examples`` examples a test, the sealed formats, the keystore file and
the CLI's parameter parsing with ``--others``. Each group runs in its own
pytest process; the generated inputs each target received are tallied
(``fuzzing.count``) and printed per target, with the total and the pytest
verdict of each group. A processor example is a sequence of one to four
events, so its targets count events (handled; or refused by the decoder, written
unchecked with values the encoder refuses), not examples. Exits non-zero if any
group fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {
    "decoders and handlers": ["tests/unit/test_fuzz_codec.py",
                              "tests/unit/test_fuzz_processors.py"],
    "sealed formats, keystore, CLI": ["tests/unit/test_fuzz_sealed.py",
                                      "tests/unit/test_fuzz_keystore.py",
                                      "tests/unit/test_fuzz_cli.py"],
}


def _run(files: list[str], examples: int) -> tuple[int, dict[str, int], float]:
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / "counts.json"
        env = {**os.environ, "DESTRA_FUZZ_PROFILE": "long",
               "DESTRA_FUZZ_EXAMPLES": str(examples), "DESTRA_FUZZ_COUNTS": str(counts_path)}
        start = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "--durations=0", *files], cwd=ROOT, env=env)
        took = time.monotonic() - start
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    return rc, counts, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=8_000,
                        help="examples a test for the decoders and handlers")
    parser.add_argument("--others", type=int, default=3_000,
                        help="examples a test for the sealed formats, keystore and CLI")
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args()
    import hypothesis

    lines = [f"fuzz run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: Hypothesis "
             f"{hypothesis.__version__}, profile 'long', {args.examples} examples a test "
             f"(decoders and handlers), {args.others} (the others); {os.cpu_count()} CPUs", ""]
    total, failed = 0, False
    for group, files in GROUPS.items():
        examples = args.examples if group == "decoders and handlers" else args.others
        rc, counts, took = _run(files, examples)
        failed |= rc != 0
        subtotal = sum(counts.values())
        total += subtotal
        lines.append(f"{group}: pytest exit {rc} ({'passed' if rc == 0 else 'FAILED'}), "
                     f"{took:.0f} s, {subtotal:,} generated inputs")
        width = max((len(t) for t in counts), default=0)
        lines += [f"  {target:<{width}}  {n:>9,}" for target, n in sorted(counts.items())]
        lines.append("")
    lines.append(f"total generated inputs: {total:,}")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
