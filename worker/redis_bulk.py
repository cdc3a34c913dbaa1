"""A Redis connection pool whose large replies are read from the socket straight into their own buffer."""

import redis
from redis._parsers import _RESP2Parser
from redis.exceptions import ConnectionError as RedisConnectionError

LARGE_REPLY_BYTES = 1 << 16


class BulkReplyParser(_RESP2Parser):
    """RESP2, with bulk strings of LARGE_REPLY_BYTES or more received into a bytearray of their size: one copy
    of the bytes, where hiredis copies a reply three times (into its buffer, into chunks, into bytes). For
    prefix-cache chunks, which are read by the megabyte, this was the larger part of the client's time."""

    def _read_response(self, disable_decoding=False, **kwargs):
        buffer = self._buffer
        start = buffer.get_pos()
        line = buffer.readline(**kwargs)
        if line[:1] == b"$" and len(line) > 1 and line[1:].isdigit() and int(line[1:]) >= LARGE_REPLY_BYTES:
            return self._read_large(int(line[1:]))
        buffer.rewind(start)
        return super()._read_response(disable_decoding=disable_decoding, **kwargs)

    def _read_large(self, size: int) -> bytearray:
        value = bytearray(size + 2)  # the value and its CRLF
        view = memoryview(value)
        have = self._buffer._buffer.readinto(view)  # what the socket buffer already holds
        while have < size + 2:
            got = self._sock.recv_into(view[have:])  # socket.timeout / OSError: the connection maps them
            if not got:
                raise RedisConnectionError("Connection closed by server.")
            have += got
        view.release()
        if value[size:] != b"\r\n":
            raise RedisConnectionError("Protocol error: a bulk reply did not end with CRLF")
        del value[size:]  # trimming the end of a bytearray copies nothing
        return value


def bulk_client(url: str, **options) -> redis.Redis:
    """A client for `url` (redis.Redis.from_url options) that reads large values with BulkReplyParser; a plain
    client where the URL asks for RESP3 (?protocol=3), which that parser does not speak."""
    client = redis.Redis.from_url(url, parser_class=BulkReplyParser, protocol=2, **options)
    if str(client.connection_pool.connection_kwargs.get("protocol")) == "3":
        return redis.Redis.from_url(url, **options)
    return client
