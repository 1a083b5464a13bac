"""Names of the files and folders of an ``ntrk predict`` run folder (docs/run_format.md): the one
place they are spelled, for the writer, ``ntrk evaluate`` and ``ntrk report`` alike (no
Lightning imported here)."""

IMAGES = "images"
RECORDS = "records.jsonl"
#: what ``records.jsonl`` held when it was last written (count, key digest, size, mtime)
RECORDS_INDEX = "records.index.json"
METRICS = "metrics.json"
REPORT = "report.md"
REPORT_JSON = "report.json"
FAILED = "failed.jsonl"
RUN_JSON = "run.json"
LOCK = "run.lock"
CONFIG = "config.yaml"
#: per-rank JSON-lines shards of the records each run appended (``<run id>.rank<r>.jsonl``)
RECORD_SHARDS = "records"
#: persisted metric states of finished samples (``<run id>.rank<r>.pt`` + ``.json`` key list)
STATES = "metric_states"
