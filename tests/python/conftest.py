# The tests import their helpers (torch_reference, process_group_worker) as top-level modules,
# whatever pytest's import mode.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
