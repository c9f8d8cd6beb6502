"""Joining a Ray cluster as the driver: an address that is no Ray head is one line at once
(`ray.init` would retry for ~20 s and end in a bare ConnectionError). The token cases need a
real token-authenticated head: tests/test_cluster.py."""

from __future__ import annotations

import http.server
import threading

import pytest

from devtools.gloo import free_port
from pipeline.core.connect import check_head, job_logs_command, submission_id
from pipeline.core.errors import UserError


def test_no_head_at_the_address_is_one_line():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=rf"no Ray head answers at {address} \(Connection refused"):
        check_head(address)


def test_the_dashboards_address_is_named_for_what_it_is():
    with pytest.raises(UserError, match=r"is a dashboard \(job API\) address"):
        check_head("http://127.0.0.1:8265")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="is an HTTP server, not a Ray head"):
            check_head(f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_the_submission_id_of_a_job_and_its_logs_command(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert submission_id() is None and job_logs_command() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       '{"runtime_env": {}, "metadata": {"job_submission_id": "dcgan-1"}}')
    assert submission_id() == "dcgan-1"
    assert job_logs_command().startswith("ray job logs dcgan-1 --address ")


@pytest.mark.parametrize(
    ("code", "details", "sent_token"),
    [("UNAUTHENTICATED", "InvalidAuthToken", False), ("UNAUTHENTICATED", "InvalidAuthToken", True),
     ("UNAVAILABLE", "last error: Connection refused", True),
     ("UNAVAILABLE", "Trying to connect an http1.x server (HTTP status 400)", True),
     ("DEADLINE_EXCEEDED", "Deadline Exceeded", True)],
)
def test_every_failed_probe_is_a_row_of_the_troubleshooting_table(code, details, sent_token):
    import grpc
    from readme_helpers import assert_in_troubleshooting

    from pipeline.core.connect import _probe_failure

    line = _probe_failure("192.0.2.2:6379", getattr(grpc.StatusCode, code), details, sent_token)
    assert line is not None
    assert_in_troubleshooting(line)
