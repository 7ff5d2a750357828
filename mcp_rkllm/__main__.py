"""`python -m mcp_rkllm`: the same as the `mcp-rkllm` command."""

import sys

from mcp_rkllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
