"""Error bodies for failures that are not raylora's own: a fixed message, the detail in the log only.

Real Ray and Python exceptions, as the ingress meets them, built directly: killing a replica to get
one would cost the session's server its engine for seconds.
"""

from __future__ import annotations

import logging
import os

import pytest
from ray.exceptions import RayActorError, RayTaskError

from cluster.errors import InvalidRequestError
from cluster.server.error_responses import describe_error, error_response
from tests.cluster.server.test_bad_input_matrix import assert_discloses_nothing

INTERNALS = "actor_id=4f2c, pid=1234, ip=10.1.2.3, namespace=raylora, \x1b[31m/work/secret/engine.py"


def _task_error() -> RayTaskError:
    try:
        raise RuntimeError(INTERNALS)
    except RuntimeError as cause:
        return RayTaskError("generate", f"Traceback (most recent call last):\n  {INTERNALS}", cause,
                            pid=os.getpid(), ip="10.1.2.3", actor_id="4f2c")


@pytest.mark.parametrize("make, status", [
    (lambda: RayActorError(error_msg=f"The actor died unexpectedly: {INTERNALS}"), 503),
    (_task_error, 500),
    (lambda: RuntimeError(INTERNALS), 500),
    (lambda: OSError(2, "No such file or directory", "/work/secret/model"), 500),
])
def test_foreign_errors_answer_a_fixed_message_and_log_the_detail(make, status, caplog):
    with caplog.at_level(logging.ERROR, logger="cluster.server.error_responses"):
        response = error_response(make())
    assert response.status_code == status
    assert_discloses_nothing(response.body.decode(), ["/work/secret"])
    assert "/work/secret" in caplog.text  # the operator still has it


def test_raylora_errors_keep_their_message_across_ray():
    error = InvalidRequestError("top_k must be between 0 and 2147483647", param="top_k")
    try:
        raise error
    except InvalidRequestError as cause:
        wrapped = RayTaskError("generate", "Traceback ...", cause)
    body = describe_error(wrapped)
    assert (body.error.code, body.error.param, body.error.message) == (400, "top_k", error.message)
