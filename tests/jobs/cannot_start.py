"""A job that cannot start: every rank fails to import a module that does not exist, before
it could import the runtime (issue 27, point 9). The launcher records the error."""

import orch_no_such_module_anywhere  # noqa: F401
