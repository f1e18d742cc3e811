"""The Redis backend: fronts and workers that share batches through Redis Streams.

:mod:`.protocol` (keys, entries, replies, errors: what both sides agree on), :mod:`.front`
(:class:`~.front.RedisBackend`, ``serve --backend redis``) and :mod:`.worker`
(``batchserve worker``: a local batcher per model serving its stream).  Import the module
you need; this face imports nothing, so a front never loads the worker.
"""
