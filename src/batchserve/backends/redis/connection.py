"""How fronts and workers reach Redis: the one place a client is made, TLS, and the ACL.

:func:`connect` makes every client (``serve --backend redis``, ``batchserve worker``,
compat's ``RedisStreamer`` and ``RedisWorker``), for ``redis://`` or ``rediss://`` (TLS)
with the certificate files of :class:`TLSFiles`.  Two kinds of failure never go away by
waiting, so a front or a worker starting up reports them at once as a
:class:`RedisSetupError` instead of retrying (:func:`diagnose`, :func:`check_commands`):

* the connection itself: ``redis://`` to a TLS port (Redis resets it, which otherwise looks
  like an outage), ``rediss://`` to a plain port (a timeout), a certificate this machine
  does not trust, a Redis that asks for a client certificate we do not have;
* an ACL user missing a command or a key the protocol needs.  :data:`FRONT_COMMANDS` and
  :data:`WORKER_COMMANDS` are every command each side sends (:func:`acl_rules` writes them
  as an ``ACL SETUSER`` line, the one docs/scaling.md shows), and each is checked at start
  with arguments that change nothing.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batchserve.backends.redis.protocol import (
    GROUP,
    READ_BLOCK_MS,
    StreamKeys,
    redact,
    with_scheme,
)
from batchserve.settings import RedisSettings

#: seconds a diagnosis may take to reach the server again (only after a failed connection)
PROBE_TIMEOUT = 1.0

#: the commands a front sends (``ACL SETUSER`` names: ``command|subcommand``); redis-py's
#: ``CLIENT SETINFO`` at connect is left out: its refusal is ignored (Redis 7.2 and newer log it
#: in ``ACL LOG``; ``+client|setinfo`` there keeps the log quiet, and is unknown to 7.0)
FRONT_COMMANDS = ("ping", "xgroup|create", "zcount", "xadd", "xread", "xdel", "xlen", "xpending")
#: the commands a worker sends
WORKER_COMMANDS = (
    "ping", "xgroup|create", "xgroup|delconsumer", "xreadgroup", "xadd", "expire",
    "xack", "xdel", "xclaim", "xpending", "xinfo|consumers", "zadd", "zremrangebyscore", "zrem", "hset",
)


class RedisSetupError(ValueError):
    """Redis refuses this front or worker for a reason waiting does not fix: the URL's
    scheme, a certificate, the ACL.  The message says what to change."""


@dataclass(frozen=True)
class TLSFiles:
    """The files of a ``rediss://`` connection (PEM): the authority that signed the server's
    certificate (absent: the system's), and a client certificate with its key, for a Redis
    that asks for one (``tls-auth-clients``)."""

    ca_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @classmethod
    def of(cls, settings: RedisSettings) -> TLSFiles:
        return cls(settings.redis_ca_file, settings.redis_certfile, settings.redis_keyfile)

    def check(self, url: str) -> None:
        """Refuse files that cannot work: given for a ``redis://`` URL, a key without its
        certificate, a file that is not there."""
        given = {flag: path for flag, path in self._flags().items() if path}
        if given and not with_scheme(url).startswith("rediss://"):
            raise RedisSetupError(f"{', '.join(given)} need a rediss:// (TLS) URL, not {redact(url)}")
        if self.keyfile and not self.certfile:
            raise RedisSetupError("--redis-keyfile needs --redis-certfile (the certificate of that key)")
        for flag, path in given.items():
            if not os.path.isfile(path):
                raise RedisSetupError(f"{flag} {path}: no such file")

    def client_options(self) -> dict:
        """redis-py's options for these files (certificates always verified, host names too)."""
        options: dict = {"ssl_cert_reqs": "required"}
        if self.ca_file:
            options["ssl_ca_certs"] = self.ca_file
        if self.certfile:
            options["ssl_certfile"] = self.certfile
            options["ssl_keyfile"] = self.keyfile or self.certfile
        return options

    def _flags(self) -> dict[str, str | None]:
        return {"--redis-ca-file": self.ca_file, "--redis-certfile": self.certfile, "--redis-keyfile": self.keyfile}


def connect(url: str, tls: TLSFiles | None = None) -> aioredis.Redis:
    """A client for ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS, with ``tls``'s files).

    Commands fail fast (no retries, short timeouts) so an outage is seen at once; the
    callers reconnect.  Files that cannot work are refused here (:meth:`TLSFiles.check`).
    """
    tls = tls or TLSFiles()
    tls.check(url)
    url = with_scheme(url)
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=READ_BLOCK_MS / 1000 + 2.0,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=10,
        **(tls.client_options() if url.startswith("rediss://") else {}),
    )


# --------------------------------------------------------------------------- connection problems


async def diagnose(url: str, tls: TLSFiles | None, error: BaseException) -> RedisSetupError | None:
    """Why connecting to ``url`` failed with ``error``, when waiting will not fix it; None
    for an outage (nothing listening, a timeout on a server that does not answer at all).

    A plain connection reset by the server is checked with a TLS handshake, a TLS
    connection that timed out or failed its handshake with a plain ``PING``: one more
    connection, only after a failure."""
    tls = tls or TLSFiles()
    where = redact(url)
    url = with_scheme(url)
    if not url.startswith(("redis://", "rediss://")):
        return None  # a unix socket: nothing to diagnose
    secure = url.startswith("rediss://")
    failure = _ssl_failure(error)
    if isinstance(failure, ssl.SSLCertVerificationError):
        reason = failure.verify_message or str(failure)
        fix = (
            f"its certificate is not signed by --redis-ca-file {tls.ca_file}" if tls.ca_file
            else "give the authority that signed its certificate with --redis-ca-file"
        )
        return RedisSetupError(f"Redis at {where}: its TLS certificate is not trusted here ({reason}); {fix}")
    if failure is not None and "CERTIFICATE_REQUIRED" in str(failure):
        if tls.certfile:
            return RedisSetupError(f"Redis at {where} refused our client certificate {tls.certfile} ({failure.reason})")
        return RedisSetupError(
            f"Redis at {where} asks for a client certificate (tls-auth-clients): give --redis-certfile and --redis-keyfile"
        )
    if failure is not None and secure and any(
        alert in str(failure) for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")
    ):
        return RedisSetupError(f"Redis at {where} refused our client certificate {tls.certfile} ({failure.reason})")
    host, port = _address(url)
    if host is None:
        return None
    if not secure and _reset_by_server(error) and await _speaks_tls(host, port):
        return RedisSetupError(
            f"Redis at {where}: the server speaks TLS: use rediss:// "
            "(with --redis-ca-file when your own authority signed its certificate)"
        )
    if secure and (failure is not None or isinstance(error, RedisTimeoutError)) and await _speaks_plain(host, port):
        return RedisSetupError(f"Redis at {where} does not speak TLS on this port: use redis://, or the port of its tls-port")
    return None


def _causes(error: BaseException) -> Iterable[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _ssl_failure(error: BaseException) -> ssl.SSLError | None:
    return next((cause for cause in _causes(error) if isinstance(cause, ssl.SSLError)), None)


def _reset_by_server(error: BaseException) -> bool:
    """The server closed the connection at once (Redis's TLS port does that to plain text)."""
    return any(
        isinstance(cause, (ConnectionResetError, BrokenPipeError)) or "closed by server" in str(cause)
        for cause in _causes(error)
    )


def _address(url: str) -> tuple[str | None, int]:
    try:
        options = parse_url(url)
    except ValueError:
        return None, 0
    return options.get("host") or "localhost", int(options.get("port") or 6379)


async def _speaks_tls(host: str, port: int) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificates not checked: only the
    protocol is in question), or answers one with a TLS alert."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), PROBE_TIMEOUT)
    except ssl.SSLError as error:
        return "ALERT" in str(error)  # a TLS server refusing us, in TLS
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return True


async def _speaks_plain(host: str, port: int) -> bool:
    """Whether ``host:port`` answers a plain-text ``PING`` as Redis does (``+PONG``, ``-NOAUTH ...``)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        answer = await asyncio.wait_for(reader.read(64), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    return answer[:1] in (b"+", b"-")


# --------------------------------------------------------------------------- the ACL


def acl_rules(commands: Iterable[str], prefix: str = "") -> str:
    """``ACL SETUSER`` rules granting ``commands`` on batchserve's keys under ``prefix`` and nothing else."""
    keys = f"~batchserve:{prefix}:*" if prefix else "~batchserve:*"
    return " ".join([f"resetkeys {keys} resetchannels -@all", *(f"+{command}" for command in commands)])


def _probes(keys: StreamKeys, consumer: str) -> dict[str, tuple]:
    """Each command but ``HSET`` with arguments that change nothing: a key that never exists
    (a missing key is an answer or an error, never a change), ``XX`` and ``NOMKSTREAM`` where
    a command would make one.  Redis checks permissions before it runs a command, so NOPERM
    is the only answer that matters here."""
    absent = f"{keys.base}:acl-check"
    return {
        "ping": ("PING",),
        "xgroup|create": ("XGROUP", "CREATE", absent, GROUP, "0"),
        "xgroup|delconsumer": ("XGROUP", "DELCONSUMER", absent, GROUP, consumer),
        "xreadgroup": ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", "1", "STREAMS", absent, ">"),
        "xread": ("XREAD", "COUNT", "1", "STREAMS", absent, "0"),
        "xadd": ("XADD", absent, "NOMKSTREAM", "*", "check", "1"),
        "expire": ("EXPIRE", absent, "1"),
        "xack": ("XACK", absent, GROUP, "0-1"),
        "xdel": ("XDEL", absent, "0-1"),
        "xlen": ("XLEN", absent),
        "xclaim": ("XCLAIM", absent, GROUP, consumer, "0", "0-1", "JUSTID"),
        "xpending": ("XPENDING", absent, GROUP, "-", "+", "1"),
        "xinfo|consumers": ("XINFO", "CONSUMERS", absent, GROUP),
        "zcount": ("ZCOUNT", absent, "0", "0"),
        "zadd": ("ZADD", absent, "XX", "0", consumer),
        "zremrangebyscore": ("ZREMRANGEBYSCORE", absent, "(0", "(0"),
        "zrem": ("ZREM", absent, consumer),
    }


async def check_commands(
    client: aioredis.Redis, url: str, commands: Iterable[str], keys: StreamKeys, consumer: str, who: str
) -> None:
    """Raise :class:`RedisSetupError` naming every command in ``commands`` (or the keys)
    that the Redis user of ``client`` may not use; ``who`` (front, worker) is for the message.

    One harmless probe per command (:func:`_probes`), in one round trip.  ``HSET`` has no
    form that writes nothing, so it is checked last, only when the rest passed, on the
    worker's own counters key (``HSET`` then ``EXPIRE``, as the worker's lease does anyway)."""
    commands = list(commands)
    probes = _probes(keys, consumer)
    async with client.pipeline(transaction=False) as pipe:
        for command in commands:
            if command in probes:
                pipe.execute_command(*probes[command])
        answers = await pipe.execute(raise_on_error=False)
    refused = [(command, answer) for command, answer in zip([c for c in commands if c in probes], answers)
               if isinstance(answer, NoPermissionError)]
    if not refused and "hset" in commands:
        stats = keys.worker_stats(consumer)
        async with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("HSET", stats, "pid", os.getpid())
            pipe.execute_command("EXPIRE", stats, "60")
            answers = await pipe.execute(raise_on_error=False)
        refused = [(command, answer) for command, answer in zip(("hset",), answers) if isinstance(answer, NoPermissionError)]
    if not refused:
        return
    user = parse_url(with_scheme(url)).get("username") or "default"
    where = redact(url)
    # a command denied: "... no permissions to run the 'xadd' command"; else a key is denied
    # ("... to access one of the keys used as arguments", "... to access a key")
    commands_refused = [command for command, answer in refused if "to run" in str(answer)]
    if len(commands_refused) < len(refused):
        raise RedisSetupError(
            f"Redis user {user!r} at {where} may not use the keys {keys.base}:* that a {who} needs "
            f"(NOPERM: {refused[0][1]}); grant them: ACL SETUSER {user} ~batchserve:* (docs/scaling.md)"
        )
    grant = " ".join(f"+{command}" for command in commands_refused)
    raise RedisSetupError(
        f"Redis user {user!r} at {where} may not run {', '.join(commands_refused)}, which a {who} needs "
        f"(NOPERM); grant them: ACL SETUSER {user} {grant} (docs/scaling.md lists every command)"
    )
