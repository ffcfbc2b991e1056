"""The edgetl-vs-defaults table of one `edgetl bench` result (README's headline table is the same function).

    .venv/bin/python benchmarks/peers_table.py benchmarks/results/hardware/threads-2/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgetl.bench.merge import peers_table

if __name__ == "__main__":
    print(peers_table(json.loads(Path(sys.argv[1]).read_text())))
