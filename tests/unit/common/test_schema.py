import orjson
import pytest

from common.errors import BadMessageError, Reason
from common.identity import image_id_for
from common.schema import SCHEMA_VERSION, Job, Lane, Op, decode_job


def test_round_trip_keeps_every_field() -> None:
    job = Job(item_id="sku-1", image_key="2", url="http://x/a.jpg", version=7, lane=Lane.LIVE)
    back = decode_job(job.to_bytes())
    assert back == job
    assert back.image_id == image_id_for("sku-1", "2")


def test_image_id_is_stable_63_bit_and_distinct_per_image() -> None:
    a = image_id_for("sku-1", "0")
    assert a == image_id_for("sku-1", "0")
    assert 0 <= a < 2**63
    assert a != image_id_for("sku-1", "1")
    assert a != image_id_for("sku-10", "")  # separator keeps ("sku-1","0") apart


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", Reason.BAD_MESSAGE),
        (b"[1, 2]", Reason.BAD_MESSAGE),
        (
            orjson.dumps({"schema_version": 99, "item_id": "a", "url": "x"}),
            Reason.UNSUPPORTED_SCHEMA,
        ),
        (
            orjson.dumps(
                {
                    "schema_version": SCHEMA_VERSION,
                    "item_id": "a",
                    "op": "explode",
                    "url": "http://x",
                }
            ),
            Reason.BAD_MESSAGE,
        ),
        (orjson.dumps({"schema_version": SCHEMA_VERSION, "item_id": "a"}), Reason.BAD_MESSAGE),
        (
            orjson.dumps({"schema_version": SCHEMA_VERSION, "item_id": "", "url": "u"}),
            Reason.BAD_MESSAGE,
        ),
        (
            orjson.dumps(
                {"schema_version": SCHEMA_VERSION, "item_id": "a", "url": "u", "surprise": 1}
            ),
            Reason.BAD_MESSAGE,
        ),
    ],
)
def test_bad_messages_are_permanent_with_reason(body: bytes, reason: Reason) -> None:
    with pytest.raises(BadMessageError) as info:
        decode_job(body)
    assert info.value.reason is reason
    assert not info.value.transient


def test_delete_needs_no_url_and_next_attempt_counts() -> None:
    job = Job(item_id="sku-9", op=Op.DELETE)
    assert job.url is None
    assert job.next_attempt().attempt == 1
    assert job.next_attempt().job_id == job.job_id
