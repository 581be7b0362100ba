#!/bin/sh
# The nightly catalogue run, as one command for a CronJob or `docker compose run`:
# publish the catalogue on the bulk lane, then finalise the run (build its index
# generation and publish it) once every job is indexed or dead-lettered.
#
#   imgfleet-nightly SOURCE [RUN_ID]
#
# SOURCE is a local path or an s3:// URL. RUN_ID defaults to nightly-<UTC date>, so a
# rerun on the same day continues the same run (`--resume`) rather than opening a second
# one. A mass-delete refusal (exit 3) stops here for a person to look at.
# `imgfleet index finalize` exits 1 while jobs are still unaccounted for; this waits and
# asks again every FINALIZE_POLL_S (default 300) for up to FINALIZE_TIMEOUT_S (default
# 21600). Any other non-zero exit (2: configuration) stops at once. When the wait runs
# out the run stays unpublished and the previous generation keeps serving: look at
# `imgfleet dlq list`, or publish anyway with `imgfleet index finalize --run RUN --force`
# (which would also roll back a newer run, should one be serving by then).
# Exit 5 from finalize means a newer run of the catalogue is already serving (yesterday's
# cut-off run finishing after today's): nothing to publish, and the index is current, so
# this exits 0. Exit 6 (the run is of another catalogue than the one serving) stops here.
set -eu

source_path=${1:?usage: imgfleet-nightly SOURCE [RUN_ID]}
run_id=${2:-nightly-$(date -u +%Y%m%d)}
timeout_s=${FINALIZE_TIMEOUT_S:-21600}
poll_s=${FINALIZE_POLL_S:-300}

echo "nightly run ${run_id}: publishing ${source_path}"
status=0
imgfleet produce catalogue "${source_path}" --run-id "${run_id}" || status=$?
if [ "${status}" -eq 4 ]; then
    # The run id exists: an earlier attempt today was cut off (continue it without
    # publishing twice) or has published already (the resume exits 4 again: go on).
    echo "nightly run ${run_id}: exists; resuming"
    status=0
    imgfleet produce catalogue "${source_path}" --resume "${run_id}" || status=$?
    [ "${status}" -eq 4 ] && status=0
fi
if [ "${status}" -ne 0 ]; then
    echo "nightly run ${run_id}: produce failed with exit code ${status}" >&2
    exit "${status}"
fi

deadline=$(( $(date +%s) + timeout_s ))
while :; do
    status=0
    imgfleet index finalize --run "${run_id}" || status=$?
    case ${status} in
        0)
            echo "nightly run ${run_id}: finalised"
            exit 0
            ;;
        1)
            ;;  # not every job accounted for yet (or a transient error): ask again later
        5)
            echo "nightly run ${run_id}: superseded by a newer run that is already serving; nothing to publish"
            exit 0
            ;;
        6)
            echo "nightly run ${run_id}: is of another catalogue than the serving index; not published (--force switches catalogues)" >&2
            exit 6
            ;;
        *)
            echo "nightly run ${run_id}: index finalize failed with exit code ${status}" >&2
            exit "${status}"
            ;;
    esac
    if [ "$(date +%s)" -ge "${deadline}" ]; then
        echo "nightly run ${run_id}: still not accounted for after ${timeout_s}s; not published" >&2
        exit 1
    fi
    sleep "${poll_s}"
done
