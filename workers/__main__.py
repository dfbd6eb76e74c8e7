"""`python -m workers --queue NAME [--queue NAME ...]`: one worker process.

The process first takes the configured memory allocator, which may run it
again from the start (see workers/allocator.py), so only light modules are
imported before that.
"""

import logging
import os
import sys

from workers.allocator import exec_with_allocator

exec_with_allocator()

from workers.main import main  # noqa: E402

code = main()
# The workers have drained; skip interpreter finalization, during which
# the SDK core's threads can still call into Python and abort the process.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
