"""``python -m worker.cli``: the same command as ``tpns-batcher``."""

from . import main

main()
