#!/usr/bin/env python3
"""Heavy memory requests beside the log (issue 14): the log's lag during a burst of heavy embeds.

    .venv/bin/python load-tests/scripts/memory_requests.py                      # 5 x 64 x 3,000 chars
    .venv/bin/python load-tests/scripts/memory_requests.py --texts 8 --heavy 8  # at the token limit
    .venv/bin/python load-tests/scripts/memory_requests.py --json               # JSON on the last line

The harness lives in ``outpost.benchmarks.memory_requests``; docs/benchmarks.md records its figures.
"""

from outpost.benchmarks.memory_requests import main

if __name__ == "__main__":
    main()
