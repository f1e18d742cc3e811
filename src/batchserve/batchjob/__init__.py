"""Offline batch jobs: ``batchserve run-batch -i IN.jsonl -o OUT.jsonl`` (docs/batch.md).

:mod:`~batchserve.batchjob.lines` is OpenAI's batch file format (input lines, output and error
lines, what an earlier run already wrote); :mod:`~batchserve.batchjob.runner` runs the lines
through the apps' own routes in this process; :mod:`~batchserve.batchjob.progress` reports.
"""
