"""Operating signals of a real worker process on RabbitMQ: /metrics equal to the real
outcomes, /readyz following the broker connection, exit codes, structured logs without
secrets, and a SIGTERM mid-run that drains and loses nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.identity import image_id_for
from common.schema import Job, decode_job
from common.storage.local import LocalStorage
from index.segments import list_segments, read_segment
from tests.support.faulty_image_server import FaultyImageServer
from tests.support.fleet import reaped
from tests.support.rabbitmq import RabbitFleet, drain_image_ids
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.corpus(items=40, seed=5)]  # `served`

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ops_env(port_file: Path, **extra: str) -> dict[str, str]:
    return {
        "IMGFLEET_METRICS__HOST": "127.0.0.1",
        "IMGFLEET_METRICS__PORT": "0",
        "IMGFLEET_METRICS__PORT_FILE": str(port_file),
        "IMGFLEET_METRICS__QUEUE_POLL_INTERVAL_S": "0.5",
        **extra,
    }


def wait_for_port(port_file: Path, worker: subprocess.Popen[bytes]) -> int:
    def written() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"worker exited with {worker.returncode} before listening")
        return port_file.exists()

    wait_for(written, 120, "the ops listener")
    return int(port_file.read_text())


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for (n, lbls), v in samples.items():
        if n == name and v:
            out[dict(lbls)[label]] += v
    return dict(out)


def settled(samples: Samples) -> float:
    return total(samples, "imgfleet_jobs_acked_total") + total(
        samples, "imgfleet_jobs_dead_lettered_total"
    )


def segment_records(store_root: Path) -> list[object]:
    storage = LocalStorage(store_root)
    return [r for key in list_segments(storage) for r in read_segment(storage, key).records()]


def catalogue_jobs(catalogue: Path) -> list[Job]:
    jobs = []
    for line in catalogue.read_text().splitlines():
        row = json.loads(line)
        for key, url in enumerate(row["image_urls"]):
            jobs.append(Job(item_id=row["item_id"], image_key=str(key), url=url, version=1))
    return jobs


def stop(worker: subprocess.Popen[bytes], timeout_s: float = 60) -> str:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    with reaped(worker):
        out, _ = worker.communicate(timeout=timeout_s)
    return out.decode()


def assert_structured(output: str) -> list[dict[str, object]]:
    lines = [line for line in output.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line is not JSON: {line[:300]}") from None
    return parsed


def test_metrics_equal_the_real_outcomes(
    served: tuple[RabbitFleet, FaultyImageServer], tmp_path: Path
) -> None:
    fleet, server = served
    jobs = catalogue_jobs(fleet.catalogue)
    flaky = next(j for j in jobs if j.url and j.url.endswith(".jpg") and "-0." in j.url)
    server.fail_next(flaky.url.rsplit("/", 1)[-1], 503, times=2)  # type: ignore[union-attr]
    fleet.publish(jobs, raw=[b"{this is not a job"])
    expected_deliveries = len(jobs) + 1

    port_file = tmp_path / "metrics.port"
    worker = fleet.spawn("work", "--worker-id", "counted", **ops_env(port_file))
    try:
        port = wait_for_port(port_file, worker)
        wait_for(lambda: http_status(port, "/readyz") == 200, 120, "the worker to be ready")
        assert http_status(port, "/healthz") == 200
        seen: list[Samples] = []

        def all_settled() -> bool:
            seen.append(scrape(port))
            return settled(seen[-1]) >= expected_deliveries and (
                total(seen[-1], "imgfleet_in_flight_jobs") == 0
            )

        wait_for(all_settled, 240, "every job to be settled")

        # The queue gauges are polled (metrics.queue_poll_interval_s), so they catch up
        # with the counters a poll later.
        def dlq_gauge_caught_up() -> bool:
            sample = scrape(port)
            dead = total(sample, "imgfleet_jobs_dead_lettered_total")
            return total(sample, "imgfleet_queue_depth", lane="dlq") == dead

        wait_for(dlq_gauge_caught_up, 60, "the DLQ depth gauge to catch up")
        after = scrape(port)
    finally:
        output = stop(worker)
    assert worker.returncode == 0, output[-3000:]

    # During the run the counters only grew, and the run was seen in progress.
    for before, later in zip(seen, [*seen[1:], after], strict=True):
        assert settled(before) <= settled(later)
    assert any(0 < settled(s) < expected_deliveries for s in seen), "never scraped mid-run"

    # After: the counters are the real outcomes, one increment per settled job.
    records = segment_records(fleet.store_root)
    acked = total(after, "imgfleet_jobs_acked_total")
    assert acked == len(records)
    assert total(after, "imgfleet_jobs_acked_total", outcome="deleted") == 0
    assert total(after, "imgfleet_jobs_acked_total", lane="bulk") == len(records)
    letters = fleet.dead_letters()
    assert by_label(after, "imgfleet_jobs_dead_lettered_total", "reason") == dict(
        Counter(letter.reason for letter in letters)
    )
    assert acked + len(letters) == expected_deliveries
    assert by_label(after, "imgfleet_jobs_retried_total", "reason") == {"http_5xx": 2}
    consumed = by_label(after, "imgfleet_jobs_consumed_total", "lane")
    assert consumed == {"bulk": len(jobs) + 2, "unknown": 1}  # the flaky one came back twice
    assert (
        sum(consumed.values())
        == expected_deliveries + 2
        == (acked + len(letters) + total(after, "imgfleet_jobs_retried_total"))
    )
    recovered = total(after, "imgfleet_jobs_acked_total", outcome="recovered")
    assert recovered == total(after, "imgfleet_decode_total", path="recovered")
    assert total(after, "imgfleet_stage_seconds_count", stage="fetch") == len(jobs) + 2
    assert total(after, "imgfleet_batch_size_sum") == acked
    assert total(after, "imgfleet_queue_depth", lane="dlq") == len(letters)
    assert total(after, "imgfleet_worker_ready") == 1
    assert total(after, "imgfleet_broker_connected") == 1
    assert any(n == "imgfleet_build_info" for n, _ in after)

    # Every line is JSON with the worker id; job lines carry the job's ids and shard.
    lines = assert_structured(output)
    assert all(line.get("worker_id") == "counted" for line in lines if "event" in line)
    dead_lines = [
        line for line in lines if line.get("event") == "dead-lettered" and "item_id" in line
    ]
    assert dead_lines and all(
        {"run_id", "item_id", "image_id", "shard", "job_id"} <= set(line) for line in dead_lines
    )
    # The broker URL carries a password; it is in no line (the user name is the same
    # word here, so neither is).
    assert "guest" not in output


def test_sigterm_mid_run_drains_within_the_deadline_and_loses_nothing(
    served: tuple[RabbitFleet, FaultyImageServer], tmp_path: Path
) -> None:
    fleet, _ = served
    catalogue = fleet.write_big_catalogue(400)
    jobs = catalogue_jobs(catalogue)
    fleet.publish(jobs)
    port_file = tmp_path / "metrics.port"
    deadline_s = 4
    worker = fleet.spawn(
        "work",
        "--worker-id",
        "drained",
        **ops_env(port_file, IMGFLEET_WORKER__SHUTDOWN_DEADLINE_S=str(deadline_s)),
    )
    with reaped(worker):
        port = wait_for_port(port_file, worker)
        wait_for(lambda: len(segment_records(fleet.store_root)) >= 30, 180, "the first segments")
        mid = scrape(port)
        assert total(mid, "imgfleet_in_flight_jobs") > 0
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=deadline_s + 20)
    output = out.decode()
    assert worker.returncode == 0, output[-3000:]
    stopped = [line for line in assert_structured(output) if line.get("event") == "worker stopped"]
    assert stopped and stopped[0]["stopped_by"] == "SIGTERM"

    indexed = {r.image_id for r in segment_records(fleet.store_root)}  # type: ignore[attr-defined]
    dead = {decode_job(letter.body).image_id for letter in fleet.dead_letters()}
    assert len(indexed) + len(dead) < len(jobs), "the run finished before the SIGTERM"
    remaining = drain_image_ids(fleet.url, fleet.prefix)
    assert indexed | dead | remaining == {image_id_for(j.item_id, j.image_key) for j in jobs}


def test_readiness_comes_back_after_an_outage_mid_run_and_the_worker_gives_up_later(
    served: tuple[RabbitFleet, FaultyImageServer], tmp_path: Path
) -> None:
    fleet, server = served
    jobs = catalogue_jobs(fleet.write_big_catalogue(160))
    fleet.publish(jobs)
    image_names = {j.url.rsplit("/", 1)[-1] for j in jobs if j.url}
    all_ids = {image_id_for(j.item_id, j.image_key) for j in jobs}
    port_file = tmp_path / "metrics.port"
    give_up_s = 8
    with TcpProxy("127.0.0.1", 5672) as proxy:
        worker = fleet.spawn(
            "work",
            "--worker-id",
            "flapping",
            **ops_env(
                port_file,
                IMGFLEET_BROKER__URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                IMGFLEET_WORKER__BROKER_GIVE_UP_S=str(give_up_s),
                IMGFLEET_WORKER__SHUTDOWN_DEADLINE_S="2",
            ),
        )

        def alive(predicate: Callable[[], bool]) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    if worker.poll() is None:
                        return predicate()
                except OSError:  # the ops listener went away: has the worker exited?
                    worker.wait(10)
                raise AssertionError(f"the worker exited with {worker.returncode}")

            return check

        with reaped(worker):
            port = wait_for_port(port_file, worker)
            wait_for(lambda: len(segment_records(fleet.store_root)) >= 8, 180, "the first segments")
            assert http_status(port, "/readyz") == 200
            # A slow origin keeps jobs in the pipeline through the outage: without it the
            # worker settles every held job (as no-ops) before the link is back.
            for name in image_names:
                server.delay_s(name, 3.0)
            assert total(scrape(port), "imgfleet_in_flight_jobs") > 0

            proxy.refusing = True  # the broker goes away mid-run...
            proxy.cut_all()
            cut_at_s = time.monotonic()
            wait_for(lambda: http_status(port, "/readyz") == 503, 20, "readyz to fail")
            assert http_status(port, "/healthz") == 200  # not ready, but alive
            away = scrape(port)
            assert total(away, "imgfleet_broker_connected") == 0
            assert total(away, "imgfleet_worker_ready") == 0
            time.sleep(2)

            proxy.refusing = False  # ...and comes back well within broker_give_up_s
            wait_for(alive(lambda: http_status(port, "/readyz") == 200), 30, "readyz to recover")
            back = scrape(port)
            assert total(back, "imgfleet_broker_connected") == 1
            assert total(back, "imgfleet_worker_ready") == 1
            server.clear_faults()

            # Past the give-up time counted from the cut, the worker is still at work, and
            # every job ends indexed or dead-lettered.
            def accounted() -> bool:
                time.sleep(0.3)
                indexed = {r.image_id for r in segment_records(fleet.store_root)}  # type: ignore[attr-defined]
                if len(indexed) < len(all_ids) // 2:
                    return False
                dead = {decode_job(d.body).image_id for d in fleet.dead_letters()}
                return time.monotonic() - cut_at_s > give_up_s + 2 and indexed | dead == all_ids

            wait_for(alive(accounted), 240, "every job to be indexed or dead-lettered")
            assert http_status(port, "/readyz") == 200

            proxy.refusing = True  # gone for good: past broker_give_up_s the worker exits 1
            proxy.cut_all()
            out, _ = worker.communicate(timeout=60)
    output = out.decode()
    assert worker.returncode == 1, output[-3000:]
    lines = assert_structured(output)
    events = [line.get("event") for line in lines]
    assert "broker connection back; ready" in events
    reconnects = [line for line in lines if line.get("event") == "reconnected"]
    assert reconnects and reconnects[0]["stale_messages"] > 0  # jobs were held across it
    exits = [line for line in lines if line.get("event") == "worker exiting: unrecoverable"]
    assert exits and exits[0]["component"] == "broker" and exits[0]["exit_code"] == 1


def test_refused_credentials_exit_2_without_the_password_in_any_line(
    served: tuple[RabbitFleet, FaultyImageServer],
) -> None:
    fleet, _ = served
    password = f"pw-{uuid.uuid4().hex}"
    worker = fleet.spawn(
        "work",
        "--worker-id",
        "denied",
        IMGFLEET_BROKER__URL=f"amqp://guest:{password}@127.0.0.1:5672/",
    )
    with reaped(worker):
        out, _ = worker.communicate(timeout=120)
    output = out.decode()
    assert worker.returncode == 2, output[-3000:]
    assert "refused the credentials" in output
    assert password not in output
