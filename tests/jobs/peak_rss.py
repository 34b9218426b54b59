"""Run `latentdit ARGS...` in this process; at exit print its peak memory on stderr.

    python tests/jobs/peak_rss.py encode SRC --out STORE --workers 1 ...

The last stderr line is "PEAK_RSS_MB <this process> <largest child>": this process's high-water
mark since it started (/proc/self/status VmHWM; getrusage's figure would include the process it
was forked from before the exec, e.g. a large pytest), and resource.getrusage's largest child
(the DataLoader workers that decoded the images, joined before the exit).
"""

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cli import main


def high_water_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


try:
    main()
finally:
    mine = high_water_mb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"PEAK_RSS_MB {mine:.0f} {children:.0f}", file=sys.stderr, flush=True)
