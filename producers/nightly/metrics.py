"""Prometheus metrics of the catalogue producer (the HTTP endpoint is wired elsewhere)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROWS = Counter(
    "imgfleet_producer_rows_total",
    "Catalogue rows read, by outcome (item or rejected).",
    ["outcome"],
)
JOBS_PUBLISHED = Counter(
    "imgfleet_producer_jobs_published_total",
    "Jobs confirmed by the broker, by op (upsert or delete).",
    ["op"],
)
JOBS_SKIPPED = Counter(
    "imgfleet_producer_jobs_skipped_total",
    "Jobs not published, by reason (duplicate image, already_published before a resume).",
    ["reason"],
)
CHECKPOINTS = Counter(
    "imgfleet_producer_checkpoints_total", "Resume points written by catalogue runs."
)
RUN_INFO = Gauge(
    "imgfleet_producer_run_info",
    "1 for the catalogue run this process is publishing.",
    ["run_id", "catalogue", "lane"],
)
RATE = Gauge("imgfleet_producer_publish_rate_jobs_per_s", "Jobs confirmed per second, so far.")
FRACTION_DONE = Gauge(
    "imgfleet_producer_fraction_done", "Share of the catalogue read (0-1; -1: unknown)."
)
ETA = Gauge("imgfleet_producer_eta_seconds", "Estimated seconds left (-1: unknown).")
