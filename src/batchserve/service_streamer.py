"""``from batchserve.service_streamer import ...``: the same names as :mod:`batchserve.compat`.

For code written against ShannonAI service-streamer: change ``from service_streamer`` to
``from batchserve.service_streamer`` and nothing else.
"""

from batchserve.compat import *  # noqa: F401,F403 - this module is an alias
from batchserve.compat import __all__  # noqa: F401
