"""CMS change requests: validation that lists every problem, and the jobs a change becomes.

A change is either an item's whole image list (``upsert``) or its removal (``delete``),
stamped with the CMS's item version (monotonically increasing; the newest wins in the
index). Validation never stops at the first problem: the CMS gets every one of them, each
with the position of the change in the batch and the field it concerns, and nothing is
published unless the whole request is valid.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from common.identity import image_id_for
from common.schema import MAX_ITEM_ID_CHARS, MAX_URL_CHARS, Job, Lane, Op
from producers.jobs import delete_job, upsert_job

CMS_RUN_ID = "cms"  # run id of every CMS job: outside any nightly run
MAX_VERSION = 2**63 - 1  # the index keeps versions as int64
URL_SCHEMES = ("http", "https", "s3")
MAX_PROBLEMS = 100  # listed in one response; the message gives the full count

_UPSERT_FIELDS = frozenset({"op", "item_id", "image_urls", "version"})
_DELETE_FIELDS = frozenset({"op", "item_id", "version"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: which change (None: the request) and which field."""

    index: int | None
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


class RequestInvalid(Exception):
    """The request cannot be accepted; ``status`` and ``code`` say how to answer."""

    def __init__(
        self,
        problems: list[Problem],
        *,
        status: int = 422,
        code: str = "validation_failed",
    ) -> None:
        self.problems = problems
        self.status = status
        self.code = code
        super().__init__(self.summary())

    def summary(self) -> str:
        n = len(self.problems)
        if n == 1:
            p = self.problems[0]
            where = "" if p.index is None else f"items[{p.index}]"
            if p.field:
                where = f"{where}.{p.field}" if where else p.field
            text = f"{where}: {p.message}" if where else p.message
            return f"{text}; nothing was published"
        return f"{n} problems in the request; nothing was published"


@dataclass(frozen=True)
class Change:
    op: Op
    item_id: str
    version: int
    image_urls: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op.value, "item_id": self.item_id}
        if self.op is Op.UPSERT:
            out["image_urls"] = list(self.image_urls)
        out["version"] = self.version
        return out


# -- request bodies ------------------------------------------------------------------


def parse_batch(body: Any, *, max_items: int, max_images: int) -> list[Change]:
    """``{"items": [change, ...]}`` -> changes; identical repeats of a change collapse."""
    if not isinstance(body, dict):
        raise RequestInvalid([Problem(None, "", 'the body must be a JSON object {"items": [...]}')])
    problems = [Problem(None, str(k), "unknown field") for k in body if k != "items"]
    items = body.get("items")
    if "items" not in body:
        problems.append(Problem(None, "items", "required"))
    elif not isinstance(items, list):
        problems.append(Problem(None, "items", "must be a list of changes"))
    elif not items:
        problems.append(Problem(None, "items", "must hold at least one change"))
    elif len(items) > max_items:
        raise RequestInvalid(
            [
                Problem(
                    None,
                    "items",
                    f"holds {len(items)} changes; at most {max_items} per request "
                    "(cms.max_items_per_request): split the batch",
                )
            ],
            status=413,
            code="too_many_items",
        )
    if problems or not isinstance(items, list):
        raise RequestInvalid(problems)

    changes: list[Change] = []
    first_at: dict[str, tuple[int, Change]] = {}
    for index, raw in enumerate(items):
        change = _change(raw, index, problems, max_images)
        if change is None:
            continue
        seen = first_at.get(change.item_id)
        if seen is None:
            first_at[change.item_id] = (index, change)
            changes.append(change)
        elif seen[1] != change:
            problems.append(
                Problem(
                    index,
                    "item_id",
                    f"item {change.item_id!r} is also changed at index {seen[0]} with other "
                    "content; send one change per item",
                )
            )
    if problems:
        raise RequestInvalid(problems)
    return changes


def parse_upsert(item_id: str, body: Any, *, max_images: int) -> Change:
    """``PUT /v1/items/{item_id}`` with ``{"image_urls": [...], "version": N}``."""
    problems: list[Problem] = []
    _check_item_id(item_id, None, "item_id", problems)
    if not isinstance(body, dict):
        problems.append(
            Problem(None, "", 'the body must be a JSON object {"image_urls": [...], "version": N}')
        )
        raise RequestInvalid(problems)
    _check_body_item_id(body, item_id, problems)
    for name in body:
        if name not in ("image_urls", "version", "item_id"):
            problems.append(Problem(None, str(name), "unknown field"))
    urls = _image_urls(body, None, problems, max_images)
    version = _version(body, None, problems)
    if problems:
        raise RequestInvalid(problems)
    assert version is not None and urls is not None
    return Change(Op.UPSERT, item_id, version, urls)


def parse_delete(item_id: str, query_version: str | None, body: Any) -> Change:
    """``DELETE /v1/items/{item_id}?version=N`` (or the version in a JSON body)."""
    problems: list[Problem] = []
    _check_item_id(item_id, None, "item_id", problems)
    version: int | None = None
    if query_version is not None:
        try:
            version = int(query_version)
        except ValueError:
            problems.append(Problem(None, "version", "must be an integer"))
        else:
            _check_version_range(version, None, problems)
    if body is not None:
        if not isinstance(body, dict):
            problems.append(Problem(None, "", 'the body must be a JSON object {"version": N}'))
            raise RequestInvalid(problems)
        _check_body_item_id(body, item_id, problems)
        for name in body:
            if name not in ("version", "item_id"):
                problems.append(Problem(None, str(name), "unknown field"))
        if "version" in body:
            in_body = _version(body, None, problems)
            if version is not None and in_body is not None and in_body != version:
                problems.append(
                    Problem(
                        None,
                        "version",
                        f"the query says {version} and the body {in_body}; give one",
                    )
                )
            version = in_body if version is None else version
    if version is None and not any(p.field == "version" for p in problems):
        problems.append(Problem(None, "version", "required (?version=N)"))
    if problems:
        raise RequestInvalid(problems)
    assert version is not None
    return Change(Op.DELETE, item_id, version)


# -- one change ----------------------------------------------------------------------


def _change(raw: Any, index: int, problems: list[Problem], max_images: int) -> Change | None:
    before = len(problems)
    if not isinstance(raw, dict):
        problems.append(Problem(index, "", "a change must be a JSON object"))
        return None
    op_raw = raw.get("op")
    op: Op | None = None
    if "op" not in raw:
        problems.append(Problem(index, "op", "required: 'upsert' or 'delete'"))
    elif op_raw not in (Op.UPSERT.value, Op.DELETE.value):
        problems.append(Problem(index, "op", f"must be 'upsert' or 'delete', got {op_raw!r}"))
    else:
        op = Op(op_raw)
    allowed = _DELETE_FIELDS if op is Op.DELETE else _UPSERT_FIELDS
    for name in raw:
        if name not in allowed:
            message = "a delete takes no image_urls" if name == "image_urls" else "unknown field"
            problems.append(Problem(index, str(name), message))
    item_id: Any = raw.get("item_id")
    if "item_id" not in raw:
        problems.append(Problem(index, "item_id", "required"))
    else:
        _check_item_id(item_id, index, "item_id", problems)
    urls = _image_urls(raw, index, problems, max_images) if op is Op.UPSERT else ()
    version = _version(raw, index, problems)
    if len(problems) > before or op is None or version is None or urls is None:
        return None
    return Change(op, item_id, version, urls)


def _check_body_item_id(body: dict[str, Any], item_id: str, problems: list[Problem]) -> None:
    if "item_id" in body and body["item_id"] != item_id:
        problems.append(
            Problem(None, "item_id", "differs from the item id in the path; leave it out")
        )


def _check_item_id(value: Any, index: int | None, name: str, problems: list[Problem]) -> None:
    if not isinstance(value, str):
        problems.append(Problem(index, name, "must be a string"))
    elif not value:
        problems.append(Problem(index, name, "must not be empty"))
    elif len(value) > MAX_ITEM_ID_CHARS:
        problems.append(
            Problem(index, name, f"has {len(value)} characters; at most {MAX_ITEM_ID_CHARS}")
        )
    elif value != value.strip():
        problems.append(Problem(index, name, "must not start or end with whitespace"))
    elif _has_control(value):
        problems.append(Problem(index, name, "must not contain control characters"))


def _version(raw: dict[str, Any], index: int | None, problems: list[Problem]) -> int | None:
    if "version" not in raw:
        problems.append(Problem(index, "version", "required"))
        return None
    value = raw["version"]
    # bool is an int subclass in Python; JSON true is not a version.
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append(Problem(index, "version", "must be an integer"))
        return None
    return value if _check_version_range(value, index, problems) else None


def _check_version_range(value: int, index: int | None, problems: list[Problem]) -> bool:
    if value < 0:
        problems.append(Problem(index, "version", "must be >= 0"))
        return False
    if value > MAX_VERSION:
        problems.append(Problem(index, "version", f"must be at most {MAX_VERSION}"))
        return False
    return True


def _image_urls(
    raw: dict[str, Any], index: int | None, problems: list[Problem], max_images: int
) -> tuple[str, ...] | None:
    if "image_urls" not in raw:
        problems.append(Problem(index, "image_urls", "required"))
        return None
    urls = raw["image_urls"]
    if not isinstance(urls, list):
        problems.append(Problem(index, "image_urls", "must be a list of URLs"))
        return None
    if not urls:
        problems.append(
            Problem(
                index,
                "image_urls",
                "must hold at least one URL (send a delete to remove every image)",
            )
        )
        return None
    if len(urls) > max_images:
        problems.append(
            Problem(
                index,
                "image_urls",
                f"holds {len(urls)} URLs; at most {max_images} images per item "
                "(producer.max_images_per_item)",
            )
        )
        return None
    before = len(problems)
    for position, url in enumerate(urls):
        message = url_problem(url)
        if message:
            problems.append(Problem(index, f"image_urls[{position}]", message))
    return tuple(urls) if len(problems) == before else None


def url_problem(url: Any) -> str | None:
    """Why an image URL is refused, or None when it is acceptable."""
    if not isinstance(url, str):
        return "must be a string"
    if not url:
        return "must not be empty"
    if len(url) > MAX_URL_CHARS:
        return f"has {len(url)} characters; at most {MAX_URL_CHARS}"
    if any(ch.isspace() for ch in url) or _has_control(url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if not parts.scheme:
        return "must be an absolute URL (http, https or s3)"
    if parts.scheme.lower() not in URL_SCHEMES:
        return f"scheme {parts.scheme!r} is not accepted (http, https or s3)"
    if not parts.netloc:
        what = "a bucket" if parts.scheme.lower() == "s3" else "a host"
        return f"must name {what}"
    return None


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


# -- jobs ----------------------------------------------------------------------------


def fingerprint(changes: list[Change]) -> str:
    """What an idempotency key is bound to: the changes, whatever the JSON's spelling."""
    data = orjson.dumps([c.as_dict() for c in changes], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


def jobs_for_change(change: Change, max_images: int, id_scope: str) -> list[Job]:
    """Jobs for image keys 0..max_images-1: upserts for the listed images, tombstones after.

    Image i is ``image_key=str(i)``, as for the nightly run, so a CMS change and a
    catalogue row address the same images. A tombstone for an image that never existed is
    harmless. Job ids are derived from ``id_scope`` (the idempotency key), so a retried
    request publishes the same job ids.
    """
    created_at_s = time.time()
    jobs = []
    for position in range(max_images):
        key = str(position)
        image_id = image_id_for(change.item_id, key)
        if change.op is Op.UPSERT and position < len(change.image_urls):
            job = upsert_job(
                run_id=CMS_RUN_ID,
                image_id=image_id,
                item_id=change.item_id,
                image_key=key,
                url=change.image_urls[position],
                version=change.version,
                lane=Lane.LIVE,
                id_scope=id_scope,
                created_at_s=created_at_s,
            )
        else:
            job = delete_job(
                run_id=CMS_RUN_ID,
                image_id=image_id,
                item_id=change.item_id,
                image_key=key,
                version=change.version,
                lane=Lane.LIVE,
                id_scope=id_scope,
                created_at_s=created_at_s,
            )
        jobs.append(job)
    return jobs
