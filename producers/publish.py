"""Turn catalogue items into jobs and publish them in confirmed batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from common.broker import Broker
from common.logging import get_logger
from common.progress import Progress
from common.schema import Job, Lane
from producers.catalogue import CatalogueItem, RejectedRow, read_catalogue


@dataclass
class PublishReport:
    run_id: str
    rows: int = 0
    items: int = 0
    jobs: int = 0
    duplicate_images: int = 0
    rejected: int = 0
    rejects: list[RejectedRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "rows": self.rows,
            "items": self.items,
            "jobs": self.jobs,
            "duplicate_images": self.duplicate_images,
            "rejected": self.rejected,
        }


def jobs_for_item(item: CatalogueItem, run_id: str, lane: Lane = Lane.BULK) -> list[Job]:
    """One job per image; the image key is the image's position, stable across runs."""
    return [
        Job(
            run_id=run_id,
            item_id=item.item_id,
            image_key=str(position),
            url=url,
            version=item.version,
            lane=lane,
        )
        for position, url in enumerate(item.image_urls)
    ]


def _batched(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        batch.append(job)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def publish_catalogue(
    broker: Broker,
    path: str | Path,
    run_id: str,
    *,
    lane: Lane = Lane.BULK,
    batch_size: int = 500,
    rejects_path: str | Path | None = None,
) -> PublishReport:
    log = get_logger("producer", run_id=run_id, source=str(path))
    report = PublishReport(run_id=run_id)
    progress = Progress(log, "catalogue rows", None)
    seen: set[int] = set()
    rejects_fh = open(rejects_path, "ab") if rejects_path else None  # noqa: SIM115

    def jobs() -> Iterator[Job]:
        for entry in read_catalogue(path):
            report.rows += 1
            progress.advance()
            if isinstance(entry, RejectedRow):
                report.rejected += 1
                if len(report.rejects) < 1000:
                    report.rejects.append(entry)
                log.warning("row rejected", line=entry.line, reason=entry.reason)
                if rejects_fh:
                    rejects_fh.write(orjson.dumps(entry.__dict__) + b"\n")
                continue
            report.items += 1
            for job in jobs_for_item(entry, run_id, lane):
                # The same image listed twice (a repeated row) is embedded once.
                if job.image_id in seen:
                    report.duplicate_images += 1
                    continue
                seen.add(job.image_id)
                yield job

    try:
        for batch in _batched(jobs(), batch_size):
            await broker.publish(batch)
            report.jobs += len(batch)
    finally:
        if rejects_fh:
            rejects_fh.close()
    log.info("published", **report.as_dict())
    return report
