"""Prefect orchestration of pab-build (the library, ``pab_build``, never imports Prefect).

The library logs through ``logging`` (model loads, CMP metrics). Prefect forwards the ``pab_build``
logger into run logs when ``PREFECT_LOGGING_EXTRA_LOGGERS=pab_build`` (the ``pab`` CLI and every
work pool's job variables set it), but Prefect's root logger stays at WARNING: without this level
a flow run started by a worker would forward only pab_build's warnings. Set here, so every flow
(build-pab, train-cmp) gets it on import.
"""

import logging

logging.getLogger("pab_build").setLevel(logging.INFO)
