"""Run `latentdit ARGS...` in this process; at exit print its peak memory on stderr.

    python tests/jobs/peak_rss.py encode SRC --out STORE --workers 1 ...

The last stderr line is "PEAK_RSS_MB <this process> <largest child>" (resource.getrusage: the
children are the DataLoader workers that decoded the images, joined before the exit).
"""

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli import main

try:
    main()
finally:
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"PEAK_RSS_MB {mine:.0f} {children:.0f}", file=sys.stderr, flush=True)
