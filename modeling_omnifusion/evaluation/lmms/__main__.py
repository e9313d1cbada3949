"""Print the folder of the offline task configs, for `lmms-eval --include_path`."""

from . import TASKS_DIR

print(TASKS_DIR)
