"""Converts a public RefCOCO/RefCOCO+/RefCOCOg refs pickle to the JSON list that
`bigvl.evaluators.public_formats.refcoco` reads, without running anything the pickle names:

  python data_pipelines/refcoco_to_json.py --refs='refs(unc).p' --out=refs_unc.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigvl.evaluators import public_formats  # pylint: disable=wrong-import-position


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the conversion; returns the exit status (2 with a one-line message on bad input)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--refs", required=True, help="refs(unc).p, refs(google).p or refs(umd).p")
  parser.add_argument("--out", required=True, help="the JSON file to write")
  args = parser.parse_args(argv)
  try:
    count = public_formats.refcoco_pickle_to_json(args.refs, args.out)
  except ValueError as e:
    print(f"refcoco_to_json: {e}", file=sys.stderr)
    return 2
  print(f"wrote {count} refs to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
