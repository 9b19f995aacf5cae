"""A module next to process_state.py: importable only if sys.path[0] is the script's directory."""

VALUE = "local module found"
