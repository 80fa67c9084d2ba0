"""Taking a task off a Redis queue without a window in which a worker's death loses it.

kombu's Redis transport takes a message with ``BRPOP``, which removes it from the queue list, and
registers it as unacknowledged (``ZADD unacked_index`` and ``HSET unacked``) in a second round
trip. A worker killed between the two (``SIGKILL``, the OOM killer, a power loss), or a Redis
that stops between them, drops that message: it is in neither the queue nor the ``unacked``
hash, so no visibility sweep can bring it back, and ``acks_late`` does not help since Celery
never saw it.

:class:`AtomicReceive` closes that window: one Lua script pops the message and registers it as
unacknowledged, in the same atomic step on the server. The rest of the transport is kombu's
(acknowledgement, the visibility sweep, restore at shutdown). A script cannot block, so when
every list is empty the channel waits with ``BLMOVE Q Q RIGHT RIGHT`` on the queue's main list: it
returns as soon as the list holds a message and leaves the list exactly as it was (it moves
the tail element back to the tail). Then the script runs again. (kombu's ``basic_get``, a one-off
``Queue.get``, stays kombu's: a worker consumes, it never gets.)

What it costs: one script run per message instead of ``BRPOP`` + ``MULTI``/``EXEC`` (one round
trip fewer), and the wait watches one list. A worker that consumes one queue (as the docs run
every node, ``-Q QUEUE``) watches its main list for up to ``brpop_timeout`` (1 s), so at rest it
sends Redis two commands a second instead of one, and a message sent with a task priority (a
list ``QUEUE\\x06\\x16N``; this project's clients send none) can wait up to that second on an
idle worker. A worker that consumes several queues watches each in turn for
:data:`MULTI_QUEUE_WAIT` seconds: on an idle worker a message can wait that long for each other
queue. Idle workers watching one list all wake when a message arrives; one takes it. Where the
server refuses the script or ``BLMOVE`` (a Redis older than 6.2, an ACL without ``EVAL``) the
channel logs one warning and takes messages with kombu's ``BRPOP``, window included.
"""

from __future__ import annotations

import logging
from time import monotonic, time
from typing import TYPE_CHECKING, Any

from kombu.transport import virtual
from kombu.transport.redis import QoS as RedisQoS
from kombu.utils.json import loads
from redis.exceptions import ResponseError

log = logging.getLogger("modelworkers.receive")

# Pops the first message of KEYS[3..] (in that order) and, when it is an envelope kombu can
# restore (a delivery tag and the exchange and routing key it came by), registers it as
# unacknowledged exactly as kombu's QoS.append does: ZADD unacked_index TAG NOW and HSET unacked
# TAG '[message, exchange, routing_key]'. Returns {index, message, tag} ('' for a message it could
# not register) or nil.
# allow-oom (Redis 7): it frees as much as it writes, and taking tasks must go on when Redis is
# full. Redis 6.2 knows no flags: it runs the script without that line (PLAIN_TAKE_SCRIPT) and
# lets a script that has written once (the RPOP) write on when full.
TAKE_SCRIPT = """#!lua flags=allow-oom
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      local props = msg['properties']
      local tag = props['delivery_tag']
      local info = props['delivery_info']
      if type(tag) == 'string' and type(info) == 'table'
          and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
        redis.call('ZADD', KEYS[1], ARGV[1], tag)
        redis.call('HSET', KEYS[2], tag, '[' .. item .. ', ' .. cjson.encode(info['exchange'])
          .. ', ' .. cjson.encode(info['routing_key']) .. ']')
        return {i - 2, item, tag}
      end
    end
    return {i - 2, item, ''}
  end
end
return false
"""
PLAIN_TAKE_SCRIPT = TAKE_SCRIPT.split("\n", 1)[1]

MULTI_QUEUE_WAIT = 0.1
"""How long a worker that consumes several queues watches one of them before the next take."""


class AtomicQoS(RedisQoS):
    """kombu's Redis QoS; a message the take script registered is not registered again."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        channel = self.channel
        if channel._registered_tag is not None and delivery_tag == channel._registered_tag:
            channel._appended = True
            virtual.QoS.append(self, message, delivery_tag)  # in memory: Redis has it already
            return
        super().append(message, delivery_tag)


class AtomicReceive:
    """Mixin for kombu's Redis ``Channel``: ``BRPOP`` + registration replaced by the take script
    and a non-destructive wait (see the module docstring)."""

    QoS = AtomicQoS

    _registered_tag: Any = None
    _appended = False
    _atomic = True  # False after the server refused the script or BLMOVE
    _wait_next = False  # the last take found nothing: wait for a message before the next
    _pending: tuple[str, list[str]] | None = None
    _take_script = TAKE_SCRIPT

    # attributes of kombu's Channel
    client: Any
    connection: Any
    global_keyprefix: str
    priority_steps: Any
    sep: str
    _queue_cycle: Any
    active_queues: Any
    brpop_timeout: Any
    _in_poll: Any
    _brpop_sent_at: Any
    qos: Any
    connection_errors: Any

    if TYPE_CHECKING:  # kombu's, on the Channel this mixes into

        def _q_for_pri(self, queue: str, pri: int) -> str: ...

        def _flush_brpop_reauth(self) -> None: ...

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self._atomic:
            super()._brpop_start(timeout)  # type: ignore[misc]
            return None
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        prefix = self.global_keyprefix or ""
        if self._wait_next:
            key = prefix + self._q_for_pri(queues[0], 0)
            wait = (self.brpop_timeout if timeout is None else timeout) or 1
            if len(queues) > 1:
                wait = min(wait, MULTI_QUEUE_WAIT)
            command: list[Any] = ["BLMOVE", key, key, "RIGHT", "RIGHT", wait]
            self._pending = ("BLMOVE", [queues[0]] if len(queues) > 1 else [])
        else:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
            qos = self.qos
            command = [
                "EVAL",
                self._take_script,
                2 + len(keys),
                prefix + qos.unacked_index_key,
                prefix + qos.unacked_key,
                *(prefix + key for key in keys),
                time(),
            ]
            self._pending = ("EVAL", keys)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        if not self._atomic or self._pending is None:
            return super()._brpop_read(**options)  # type: ignore[misc]
        command, keys = self._pending
        self._pending = None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next round reconnects
                raise
            except ResponseError as exc:
                if command == "EVAL" and self._take_script is TAKE_SCRIPT and "compil" in str(exc):
                    self._take_script = PLAIN_TAKE_SCRIPT  # a Redis before 7.0: no script flags
                else:
                    self._fall_back(command, exc)
                raise virtual.Empty() from None
            if command == "BLMOVE":
                self._wait_next = False  # something arrived, or the wait ended: take again
                if reply is None and keys:
                    self._queue_cycle.rotate(keys[0])  # several queues: watch the next one
                raise virtual.Empty()
            if not reply:
                self._wait_next = True
                raise virtual.Empty()
            index, item, tag = reply
            return self._deliver_taken(keys[int(index)], item, tag or None)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_taken(self, key: str, item: bytes, tag: bytes | None) -> bool:
        queue = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        # the tag as kombu's message will carry it; a tag that is not UTF-8 never matches, and
        # the message fails to decode below anyway
        self._registered_tag = tag.decode("utf-8", "replace") if tag else None
        self._appended = False
        try:
            self.connection._deliver(loads(item.decode()), queue)
        finally:
            self._registered_tag = None
            if tag is not None and not self._appended:
                # registered by the script but not handed to a consumer (refused, or not
                # decodable here): nothing will acknowledge it, so nothing must restore it
                self._unregister(tag)
        return True

    def _unregister(self, tag: bytes) -> None:
        try:
            self.qos._remove_from_indices(tag).execute()
        except self.connection_errors:
            log.warning("could not remove refused message %r from the unacked index", tag)

    def _fall_back(self, command: str, exc: ResponseError) -> None:
        self._atomic = False
        self._wait_next = False
        log.warning(
            "the Redis server refused %s (%s): taking tasks with BRPOP, which loses a task if "
            "this worker dies between taking it and registering it as unacknowledged",
            "the take script" if command == "EVAL" else command,
            exc,
        )
