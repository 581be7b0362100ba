"""CMS request validation: every problem reported, with its index, field and message."""

from __future__ import annotations

from typing import Any

import pytest

from common.identity import image_id_for, job_id_for
from common.schema import Lane, Op
from producers.cms.schema import (
    MAX_VERSION,
    Change,
    Problem,
    RequestInvalid,
    fingerprint,
    jobs_for_change,
    parse_batch,
    parse_delete,
    parse_upsert,
)

URL = "https://cdn.test/a.jpg"


def _batch(body: Any, max_items: int = 10, max_images: int = 4) -> list[Change]:
    return parse_batch(body, max_items=max_items, max_images=max_images)


def _problems(body: Any, **kw: Any) -> list[tuple[int | None, str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        _batch(body, **kw)
    assert caught.value.status == 422
    return [(p.index, p.field, p.message) for p in caught.value.problems]


def _upsert(**fields: Any) -> dict[str, Any]:
    return {"op": "upsert", "item_id": "sku-1", "image_urls": [URL], "version": 1, **fields}


def test_a_valid_batch_becomes_changes_in_order() -> None:
    changes = _batch(
        {
            "items": [
                _upsert(item_id="a", image_urls=[URL, "s3://bucket/k.png", "http://h:8080/x"]),
                {"op": "delete", "item_id": "b", "version": 0},
            ]
        }
    )
    assert changes == [
        Change(Op.UPSERT, "a", 1, (URL, "s3://bucket/k.png", "http://h:8080/x")),
        Change(Op.DELETE, "b", 0),
    ]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], [(None, "", 'the body must be a JSON object {"items": [...]}')]),
        ("x", [(None, "", 'the body must be a JSON object {"items": [...]}')]),
        ({}, [(None, "items", "required")]),
        ({"items": {}}, [(None, "items", "must be a list of changes")]),
        ({"items": []}, [(None, "items", "must hold at least one change")]),
        (
            {"items": [_upsert()], "dry_run": True},
            [(None, "dry_run", "unknown field")],
        ),
    ],
)
def test_request_level_problems(body: Any, expected: list[tuple[Any, ...]]) -> None:
    assert _problems(body) == expected


def test_too_many_items_is_413_and_names_the_limit() -> None:
    with pytest.raises(RequestInvalid) as caught:
        _batch({"items": [_upsert(item_id=f"i{i}") for i in range(4)]}, max_items=3)
    assert caught.value.status == 413
    assert caught.value.code == "too_many_items"
    assert caught.value.problems == [
        Problem(
            None,
            "items",
            "holds 4 changes; at most 3 per request (cms.max_items_per_request): split the batch",
        )
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (5, [(0, "", "a change must be a JSON object")]),
        (
            {"item_id": "a", "version": 1},
            [(0, "op", "required: 'upsert' or 'delete'")],
        ),
        (
            {"op": "put", "item_id": "a", "version": 1},
            [(0, "op", "must be 'upsert' or 'delete', got 'put'")],
        ),
        (_upsert(colour="red"), [(0, "colour", "unknown field")]),
        (
            {"op": "delete", "item_id": "a", "version": 1, "image_urls": [URL]},
            [(0, "image_urls", "a delete takes no image_urls")],
        ),
        ({"op": "delete", "version": 1}, [(0, "item_id", "required")]),
        (_upsert(item_id=12), [(0, "item_id", "must be a string")]),
        (_upsert(item_id=""), [(0, "item_id", "must not be empty")]),
        (_upsert(item_id="x" * 513), [(0, "item_id", "has 513 characters; at most 512")]),
        (_upsert(item_id=" a"), [(0, "item_id", "must not start or end with whitespace")]),
        (_upsert(item_id="a\x00b"), [(0, "item_id", "must not contain control characters")]),
        ({"op": "delete", "item_id": "a"}, [(0, "version", "required")]),
        (_upsert(version="3"), [(0, "version", "must be an integer")]),
        (_upsert(version=1.5), [(0, "version", "must be an integer")]),
        (_upsert(version=True), [(0, "version", "must be an integer")]),
        (_upsert(version=-1), [(0, "version", "must be >= 0")]),
        (_upsert(version=MAX_VERSION + 1), [(0, "version", f"must be at most {MAX_VERSION}")]),
        ({"op": "upsert", "item_id": "a", "version": 1}, [(0, "image_urls", "required")]),
        (_upsert(image_urls=URL), [(0, "image_urls", "must be a list of URLs")]),
        (
            _upsert(image_urls=[]),
            [(0, "image_urls", "must hold at least one URL (send a delete to remove every image)")],
        ),
        (
            _upsert(image_urls=[URL] * 5),
            [
                (
                    0,
                    "image_urls",
                    "holds 5 URLs; at most 4 images per item (producer.max_images_per_item)",
                )
            ],
        ),
    ],
)
def test_each_change_problem_is_named_precisely(
    change: Any, expected: list[tuple[Any, ...]]
) -> None:
    assert _problems({"items": [change]}) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (7, "must be a string"),
        ("", "must not be empty"),
        ("https://h/" + "x" * 8200, "has 8210 characters; at most 8192"),
        ("https://h/a b.jpg", "must not contain whitespace or control characters"),
        ("https://h/a\x7f.jpg", "must not contain whitespace or control characters"),
        ("/images/a.jpg", "must be an absolute URL (http, https or s3)"),
        ("ftp://h/a.jpg", "scheme 'ftp' is not accepted (http, https or s3)"),
        ("file:///etc/passwd", "scheme 'file' is not accepted (http, https or s3)"),
        ("javascript:alert(1)", "scheme 'javascript' is not accepted (http, https or s3)"),
        ("http:///a.jpg", "must name a host"),
        ("s3:///key.jpg", "must name a bucket"),
        ("http://[::1/a.jpg", "is not a valid URL: Invalid IPv6 URL"),
    ],
)
def test_each_url_problem_names_its_position(url: Any, message: str) -> None:
    change = _upsert(image_urls=[URL, url])
    assert _problems({"items": [change]}) == [(0, "image_urls[1]", message)]


def test_every_problem_of_every_change_is_listed_with_its_index() -> None:
    problems = _problems(
        {
            "items": [
                _upsert(),
                _upsert(item_id="b", version=-2, image_urls=["ftp://x/y", URL, "nope"]),
                {"op": "delete", "item_id": "", "version": "x", "extra": 1},
            ]
        }
    )
    assert problems == [
        (1, "image_urls[0]", "scheme 'ftp' is not accepted (http, https or s3)"),
        (1, "image_urls[2]", "must be an absolute URL (http, https or s3)"),
        (1, "version", "must be >= 0"),
        (2, "extra", "unknown field"),
        (2, "item_id", "must not be empty"),
        (2, "version", "must be an integer"),
    ]


def test_a_repeated_identical_change_collapses_and_a_conflicting_one_is_refused() -> None:
    same = _batch({"items": [_upsert(), _upsert(), {"op": "delete", "item_id": "b", "version": 2}]})
    assert [c.item_id for c in same] == ["sku-1", "b"]
    assert _problems(
        {"items": [_upsert(), _upsert(item_id="b"), _upsert(version=2), _upsert(op="delete")]}
    ) == [
        (
            2,
            "item_id",
            "item 'sku-1' is also changed at index 0 with other content; send one change per item",
        ),
        (3, "image_urls", "a delete takes no image_urls"),
    ]
    assert _problems(
        {"items": [_upsert(), {"op": "delete", "item_id": "sku-1", "version": 1}]}
    ) == [
        (
            1,
            "item_id",
            "item 'sku-1' is also changed at index 0 with other content; send one change per item",
        )
    ]


def test_single_upsert_takes_the_item_id_from_the_path() -> None:
    change = parse_upsert("sku/9", {"image_urls": [URL], "version": 4}, max_images=4)
    assert change == Change(Op.UPSERT, "sku/9", 4, (URL,))
    same_id = parse_upsert("a", {"item_id": "a", "image_urls": [URL], "version": 4}, max_images=4)
    assert same_id.item_id == "a"
    with pytest.raises(RequestInvalid) as caught:
        parse_upsert(" a", {"item_id": "b", "image_urls": "x", "op": "upsert"}, max_images=4)
    assert [(p.index, p.field, p.message) for p in caught.value.problems] == [
        (None, "item_id", "must not start or end with whitespace"),
        (None, "item_id", "differs from the item id in the path; leave it out"),
        (None, "op", "unknown field"),
        (None, "image_urls", "must be a list of URLs"),
        (None, "version", "required"),
    ]
    assert "nothing was published" in caught.value.summary()
    with pytest.raises(RequestInvalid) as caught:
        parse_upsert("a", [URL], max_images=4)
    assert caught.value.summary() == (
        'the body must be a JSON object {"image_urls": [...], "version": N}; nothing was published'
    )


@pytest.mark.parametrize(
    ("query", "body", "expected"),
    [
        (None, None, [(None, "version", "required (?version=N)")]),
        ("x", None, [(None, "version", "must be an integer")]),
        ("-3", None, [(None, "version", "must be >= 0")]),
        ("3", {"version": 4}, [(None, "version", "the query says 3 and the body 4; give one")]),
        (None, {"version": 1, "why": "x"}, [(None, "why", "unknown field")]),
        (None, {"version": "1"}, [(None, "version", "must be an integer")]),
        (None, [1], [(None, "", 'the body must be a JSON object {"version": N}')]),
    ],
)
def test_delete_problems(query: str | None, body: Any, expected: list[tuple[Any, ...]]) -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_delete("sku-1", query, body)
    assert [(p.index, p.field, p.message) for p in caught.value.problems] == expected


def test_delete_takes_the_version_from_the_query_or_the_body() -> None:
    assert parse_delete("a", "7", None) == Change(Op.DELETE, "a", 7)
    assert parse_delete("a", None, {"version": 8}) == Change(Op.DELETE, "a", 8)
    assert parse_delete("a", "9", {"version": 9, "item_id": "a"}) == Change(Op.DELETE, "a", 9)


def test_an_upsert_becomes_image_jobs_then_tombstones_up_to_the_image_limit() -> None:
    change = Change(Op.UPSERT, "sku-1", 7, ("http://h/0.jpg", "http://h/1.jpg"))
    jobs = jobs_for_change(change, 4, "cms:abc")
    assert [(j.image_key, j.op, j.url) for j in jobs] == [
        ("0", Op.UPSERT, "http://h/0.jpg"),
        ("1", Op.UPSERT, "http://h/1.jpg"),
        ("2", Op.DELETE, None),
        ("3", Op.DELETE, None),
    ]
    for job in jobs:
        assert (job.item_id, job.version, job.lane, job.run_id) == ("sku-1", 7, Lane.LIVE, "cms")
        assert job.job_id == job_id_for("cms:abc", image_id_for("sku-1", job.image_key), job.op)
    # The same scope gives the same ids; another scope other ids.
    assert [j.job_id for j in jobs_for_change(change, 4, "cms:abc")] == [j.job_id for j in jobs]
    assert not {j.job_id for j in jobs_for_change(change, 4, "cms:xyz")} & {j.job_id for j in jobs}


def test_a_delete_becomes_a_tombstone_for_every_image_key() -> None:
    jobs = jobs_for_change(Change(Op.DELETE, "sku-2", 3), 4, "cms:k")
    assert [(j.image_key, j.op, j.url, j.version) for j in jobs] == [
        (str(i), Op.DELETE, None, 3) for i in range(4)
    ]


def test_the_fingerprint_ignores_json_spelling_but_not_content() -> None:
    a = _batch({"items": [_upsert()]})
    b = _batch({"items": [{"version": 1, "image_urls": [URL], "item_id": "sku-1", "op": "upsert"}]})
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(_batch({"items": [_upsert(version=2)]}))
