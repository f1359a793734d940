"""Run a SuperNode's ClientApp tasks inside the market worker (SuperNode ``--isolation process``).

With Flower's default isolation, the SuperNode's SuperExec starts a new ``flwr-clientapp``
process for every message; that process imports Flower, installs the FAB, answers one message
and exits (2-4 s here, per message, per market). A secure sum is four or five message stages, so
process start-up alone would cost 10-20 s per sum. With ``--isolation process`` Flower leaves
task execution to an external executor. :class:`InProcessTaskExecutor` is that executor for one
market: it acquires ClientApp tasks from the SuperNode's Runtime API, pulls the message, hands it
to the market worker in this process and pushes the reply, using the same Runtime API calls as
``flwr-clientapp`` (token-scoped client, task heartbeats, task output with status).

Only our app is executed: a task whose FAB does not name
``fedmm_secure.runtime.flower.app:client_app`` as its ClientApp is failed, never run, so a
SuperNode wired to this executor cannot be used to run someone else's code on the market's
machine.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...errors import ProtocolError
from .tuning import OBJECT_PULL_BACKOFF_S, OBJECT_PULL_CAP_S

if TYPE_CHECKING:
    from .doorbell import Doorbell

__all__ = ["InProcessTaskExecutor", "CLIENTAPP_REF", "fab_clientapp_ref"]

CLIENTAPP_REF = "fedmm_secure.runtime.flower.app:client_app"
_PULL_MAX_S = 600.0    # give up on a message whose objects never arrive
_STOP_CHECK_S = 0.1   # a doorbell wait looks at the stop event this often
_HEARTBEAT_S = 10.0   # Flower's task heartbeat interval is 30 s; stay well inside it


def fab_clientapp_ref(fab_content: bytes) -> str | None:
    """The ``[tool.flwr.app.components] clientapp`` reference of a FAB (a zip), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as z:
            meta = tomllib.loads(z.read("pyproject.toml").decode("utf-8"))
        return str(meta["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError):
        return None


class InProcessTaskExecutor:
    """Acquire and run one SuperNode's ClientApp tasks in this process.

    ``handle(kind, payload) -> (kind, payload)`` is the market worker's dispatcher; it runs on the
    thread that calls :meth:`run_forever` / :meth:`run_one` (tasks are handled one at a time, in
    order, as the SuperNode hands them out). ``doorbell`` (a :class:`~.doorbell.Doorbell` the
    SuperNode rings when a task is waiting): between tasks, wait for a ring, polling every
    ``poll_interval`` only in case one is lost.
    """

    def __init__(self, *, runtime_api_address: str, handle: Callable[[str, bytes], tuple[str, bytes]],
                 insecure: bool, root_certificates: bytes | None = None, poll_interval: float = 0.05,
                 log: Callable[[str], None] | None = None, doorbell: Doorbell | None = None) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._address, self._insecure, self._certs = runtime_api_address, insecure, root_certificates
        self._handle, self._poll, self._doorbell = handle, poll_interval, doorbell
        # Failed tasks and refused FABs are the market operator's business: warnings on this
        # module's logger unless the caller collects them itself.
        self._log = log if log is not None else logging.getLogger(__name__).warning
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=insecure, root_certificates=root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        self._fab_ok: dict[str, bool] = {}
        self.tasks_run = 0

    # ------------------------------------------------------------------ loop
    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        errors = 0
        while not stop.is_set():
            try:
                ran = self.run_one()
                errors = 0
            except Exception as e:  # a failed task or a SuperNode hiccup must not end the market
                errors += 1
                if errors <= 3 or errors % 100 == 0:
                    self._log(f"executor: {type(e).__name__}: {e} ({errors} in a row)")
                ran = False
            if not ran:
                if errors:   # back off while the SuperNode is unreachable (up to 2 s)
                    stop.wait(min(2.0, self._poll * 2 ** min(errors, 6)))
                elif self._doorbell is not None:
                    self._wait_for_doorbell(stop)
                else:
                    stop.wait(self._poll)

    def _wait_for_doorbell(self, stop: threading.Event) -> None:
        """Up to one poll interval for a ring, in slices, so that a stop is seen within
        ``_STOP_CHECK_S`` rather than after the whole (fallback) poll interval."""
        assert self._doorbell is not None
        deadline = time.monotonic() + self._poll
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._doorbell.wait(min(left, _STOP_CHECK_S)):
                return

    def run_one(self) -> bool:
        """Run the next pending ClientApp task, if any; True if one was run."""
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            return False
        client = self._task_client(res.token)
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(client, beat_stop), daemon=True)
        beat.start()
        context, status, details = None, SubStatus.FAILED, "task failed"
        try:
            status, details, context = self._run_task(client)
        finally:
            beat_stop.set()
            beat.join()
            self._push_output(client, context, status, details)
            client.close()
            self.tasks_run += 1
        return True

    # ------------------------------------------------------------------ one task
    def _task_client(self, token: str):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self._address, insecure=self._insecure, root_certificates=self._certs,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker())

    def _run_task(self, client):
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message

        from .app import reply_for

        message, context, run, fab = _pull_task_input(client)
        if not self._fab_allowed(fab):
            reason = f"this SuperNode only runs {CLIENTAPP_REF}"
            push_message(client, Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
                                         reply_to=message), context)
            self._log(f"refused run {run.run_id}: its FAB names another ClientApp")
            return SubStatus.FAILED, reason, context
        try:
            reply = reply_for(message, self._handle, node_config=context.node_config)
            status, details = SubStatus.COMPLETED, ""
        except Exception as e:  # the ServerApp sees a Flower error reply (a dropout), not a hang
            reason = f"{type(e).__name__}: {e}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            status, details = SubStatus.FAILED, reason
            self._log(f"task failed: {reason}")
        push_message(client, reply, context)
        return status, details, context

    def _fab_allowed(self, fab) -> bool:
        ok = self._fab_ok.get(fab.hash_str)
        if ok is None:
            ok = self._fab_ok[fab.hash_str] = fab_clientapp_ref(fab.content) == CLIENTAPP_REF
        return ok

    @staticmethod
    def _heartbeat(client, stop: threading.Event) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

        while not stop.wait(_HEARTBEAT_S):
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception:  # a missed heartbeat is Flower's to judge; never kill the worker
                pass

    @staticmethod
    def _push_output(client, context, status, details) -> None:
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(client=client, context=context, sub_status=status, details=details)


def _pull_task_input(client):
    """``flwr-clientapp``'s task input pull, with a short retry for objects still in transit.

    A task becomes visible as soon as the SuperNode has stored the message, possibly before it
    has stored the message's objects; Flower's default retry then waits 1 s, 2 s, ... (it was
    written for a freshly started process that is never that early). We retry after 20 ms,
    doubling up to 50 ms (:mod:`.tuning`).
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise ProtocolError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=_PULL_MAX_S, initial_backoff=OBJECT_PULL_BACKOFF_S,
        backoff_cap=OBJECT_PULL_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
    return message, context, run, fab


def wait_for_runtime_api(address: str, *, timeout: float) -> None:
    """Block until something accepts TCP connections on ``address`` (the SuperNode has started)."""
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ProtocolError(f"no SuperNode Runtime API at {address} after {timeout:.0f} s") from None
            time.sleep(0.1)
