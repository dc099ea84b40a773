#!/usr/bin/env python3
"""The agent benchmark: the same code and options as ``outpost bench agent``.

    .venv/bin/python load-tests/scripts/agent.py            # about a minute: broker hops, then the pipeline
    .venv/bin/python load-tests/scripts/agent.py --quick    # about 30 s
    .venv/bin/python load-tests/scripts/agent.py --json     # one JSON object on the last line

The harness lives in ``outpost.benchmarks.agent`` (load-tests/outpost/benchmarks/) so the CLI, this
script and the smoke test run the same thing; docs/benchmarks.md records what it measured.
"""

import sys

from outpost.cli.main import main

if __name__ == "__main__":
    sys.argv = ["outpost", "bench", "agent", *sys.argv[1:]]
    main()
