"""Sub-commands of the ``spatialattn`` CLI, one module each (see :mod:`spatialattn.cli`)."""
