"""Admission control: a waiting room in front of new checkouts, in the spirit of Cloudflare Waiting
Room and Queue-it.

Why: in the last days before a CPNS deadline demand is many times what stamping can serve. Letting
everyone in would grow the paid-but-unstamped backlog past the refund deadline; turning people away
with errors is what went wrong in 2024. So new checkouts flow in at a configured outflow and everyone
else gets a FIFO ticket with a position and an ETA, and comes back when admitted.

How: all state is a handful of Redis keys changed by one Lua script at a time (atomic across every web
process). Tickets are numbered in arrival order; ``head`` is the highest number admitted. A token
bucket refilled at the outflow rate moves ``head`` forward, and a cap on admissions within the last
session window bounds active checkouts. Tickets and admission tokens are HMAC-signed, so they can't be
forged or reordered, and carry the queue's epoch, so after Redis loses the queue old tickets are
recognised as stale instead of jumping the line. Admission tokens are single-use.

Only ``POST /api/v1/orders`` goes through here: status polls, downloads, payment notifications,
verification, paid work and refunds are never queued.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import redis

from shared.config import Settings
from shared.errors import DomainError


class Mode(StrEnum):
    AUTO = "auto"            # admit at the outflow rate, queue the rest
    QUEUE_ALL = "queue_all"  # everyone new waits; nobody is admitted until ops switch back
    PAUSED = "paused"        # sales suspended: no tickets, come back later


class AdmissionUnavailable(DomainError):
    code = "admission_unavailable"
    status = 503


class SalesPaused(DomainError):
    code = "sales_paused"
    status = 503


class InvalidAdmission(DomainError):
    code = "invalid_admission"
    status = 403


@dataclass(frozen=True)
class Admitted:
    """Let through now (directly, or by a valid admission token)."""

    ticket: int | None = None


@dataclass(frozen=True)
class Queued:
    ticket: str
    position: int
    eta_seconds: int


@dataclass(frozen=True)
class _Line:
    """What one run of the advance script said about the line, and when (``time.monotonic``)."""

    head: int
    tail: int
    epoch: str
    mode: Mode
    at: float


@dataclass(frozen=True)
class QueueStatus:
    position: int
    eta_seconds: int
    admitted: bool
    admission_token: str | None = None


# KEYS: tail, head, tokens, stamp, active, mode, epoch
# ARGV: now_ms, rate_per_minute, burst, active_cap, session_ms, want_direct (1/0), member, new_epoch
# Returns {outcome, head, tail, epoch, mode} where outcome is 1 = admitted directly, 0 = not (and a
# ticket was issued if want_direct was 1), 2 = mode forbids movement. The queue's epoch comes back
# with every call (made here if Redis has none), so a decision or a poll is one round trip.
_ADVANCE = """
local epoch = redis.call('GET', KEYS[7])
if not epoch then
  epoch = ARGV[8]
  redis.call('SET', KEYS[7], epoch)
end
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local session = tonumber(ARGV[5])
local want_direct = ARGV[6] == '1'
local mode = redis.call('GET', KEYS[6]) or 'auto'
local tail = tonumber(redis.call('GET', KEYS[1]) or '0')
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
if mode ~= 'auto' then
  if want_direct and mode == 'queue_all' then
    tail = redis.call('INCR', KEYS[1])
  end
  return {2, head, tail, epoch, mode}
end
local tokens = tonumber(redis.call('GET', KEYS[3]) or tostring(burst))
local stamp = tonumber(redis.call('GET', KEYS[4]) or tostring(now))
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate / 60000.0)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - session)
local room = cap - redis.call('ZCARD', KEYS[5])
local waiting = tail - head
local move = math.floor(math.min(tokens, waiting, room))
if move > 0 then
  for i = head + 1, head + move do
    redis.call('ZADD', KEYS[5], now, 't' .. i)
  end
  head = head + move
  tokens = tokens - move
  redis.call('SET', KEYS[2], head)
end
local outcome = 0
if want_direct then
  if tail == head and tokens >= 1 and room - move >= 1 then
    tokens = tokens - 1
    redis.call('ZADD', KEYS[5], now, ARGV[7])
    outcome = 1
  else
    tail = redis.call('INCR', KEYS[1])
  end
end
redis.call('SET', KEYS[3], tostring(tokens))
redis.call('SET', KEYS[4], tostring(now))
return {outcome, head, tail, epoch, mode}
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs small JSON claims with HMAC-SHA256; a different ``purpose`` can't be swapped in."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(f"admission:{secret}".encode()).digest()

    def sign(self, purpose: str, claims: dict) -> str:
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        mac = hmac.new(self._key, f"{purpose}.{body}".encode(), hashlib.sha256).digest()[:18]
        return f"{body}.{_b64(mac)}"

    def verify(self, purpose: str, token: str) -> dict | None:
        try:
            body, mac = token.split(".", 1)
            expected = hmac.new(self._key, f"{purpose}.{body}".encode(), hashlib.sha256).digest()[:18]
            if not hmac.compare_digest(_unb64(mac), expected):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        return claims if isinstance(claims, dict) else None


class AdmissionController:
    # A queue poll may answer from what this process learnt of the line this recently instead of asking
    # Redis again. Thousands of buyers poll every few seconds at the peak; with this, each web process
    # runs the advance at most a few times a second whatever the polling rate, and a position is at
    # most this stale (a fraction of one admission at any outflow we run).
    LINE_MAX_AGE_SECONDS = 0.2
    # The measured outflow moves by the minute; re-reading it more often only costs round trips.
    OUTFLOW_MAX_AGE_SECONDS = 5.0

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.signer = Signer(settings.secret_key)
        p = f"{settings.redis_key_prefix}adm:"
        self.keys = [f"{p}tail", f"{p}head", f"{p}tokens", f"{p}stamp", f"{p}active", f"{p}mode", f"{p}epoch"]
        self._epoch_key = self.keys[6]
        self._used_prefix = f"{p}used:"
        self._stats_prefix = f"{settings.redis_key_prefix}stats:stamped:"
        self._script = client.register_script(_ADVANCE)
        self._line: _Line | None = None
        self._outflow: tuple[float, int] | None = None

    # -- configuration ----------------------------------------------------------------------------
    def mode(self) -> Mode:
        raw = self._call(self.redis.get, self.keys[5])
        return Mode(raw.decode()) if raw else Mode.AUTO

    def set_mode(self, mode: Mode) -> None:
        self._call(self.redis.set, self.keys[5], Mode(mode).value)

    def outflow_per_minute(self) -> int:
        """The configured rate, or (by default) the measured stamping throughput, never below a floor."""
        if self.settings.admission_per_minute > 0:
            return self.settings.admission_per_minute
        minute = int(time.time() // 60)
        keys = [f"{self._stats_prefix}{m}" for m in range(minute - 10, minute)]
        counts = [int(v) for v in self._call(self.redis.mget, keys) if v is not None]
        measured = max(counts, default=0)
        return max(self.settings.admission_min_per_minute, measured)

    # -- the waiting room -------------------------------------------------------------------------
    def admit_or_queue(self) -> Admitted | Queued:
        """Admit a new checkout now if the outflow allows and nobody is waiting; else issue a ticket."""
        outcome, line, mode = self._advance(direct=True)
        if mode == Mode.PAUSED:
            raise SalesPaused("Ticket sales are paused; please come back later.")
        if outcome == 1:
            return Admitted()
        position = max(1, line.tail - line.head)
        ticket = self.signer.sign("ticket", {"n": line.tail, "e": line.epoch, "t": int(time.time())})
        return Queued(ticket=ticket, position=position, eta_seconds=self._eta(position))

    def status(self, ticket: str) -> QueueStatus:
        claims = self.signer.verify("ticket", ticket)
        if claims is None:
            raise InvalidAdmission("This queue ticket is not valid.", code="invalid_ticket", status=404)
        if time.time() - claims.get("t", 0) > self.settings.ticket_seconds:
            raise InvalidAdmission("This queue ticket has expired; please start again.",
                                   code="ticket_expired", status=410)
        line = self._recent_line(claims.get("e"))
        if claims.get("e") != line.epoch:
            raise InvalidAdmission("This queue ticket has expired; please start again.",
                                   code="ticket_expired", status=410)
        if line.mode == Mode.PAUSED:  # the ticket keeps its place; nobody is let in meanwhile
            raise SalesPaused("Ticket sales are paused; your place in the queue is kept. Please check "
                              "again later.")
        number = int(claims["n"])
        position = max(0, number - line.head)
        if position > 0:
            return QueueStatus(position=position, eta_seconds=self._eta(position), admitted=False)
        token = self.signer.sign("admission", {
            "n": number, "e": claims["e"], "x": int(time.time()) + self.settings.admission_token_seconds})
        return QueueStatus(position=0, eta_seconds=0, admitted=True, admission_token=token)

    def check_token(self, token: str) -> dict:
        """Verify an admission token without spending it (see :meth:`spend_token`)."""
        claims = self.signer.verify("admission", token)
        if claims is None:
            raise InvalidAdmission("This admission token is not valid.")
        line = self._recent_line(claims.get("e"))
        if claims.get("x", 0) < time.time() or claims.get("e") != line.epoch:
            raise InvalidAdmission("This admission token has expired; please queue again.",
                                   code="admission_expired")
        if line.mode == Mode.PAUSED:
            raise SalesPaused("Ticket sales are paused; please come back later.")
        return claims

    def spend_token(self, claims: dict) -> None:
        """Single use: the first create to spend a token wins; any other is refused."""
        key = f"{self._used_prefix}{claims['e']}:{claims['n']}"
        ttl = self.settings.admission_token_seconds + 60
        if not self._call(self.redis.set, key, "1", nx=True, ex=ttl):
            raise InvalidAdmission("This admission token was already used.", code="admission_used",
                                   status=409)

    def record_stamped(self, count: int = 1) -> None:
        """Called by stamping workers: the measured throughput the default outflow follows."""
        key = f"{self._stats_prefix}{int(time.time() // 60)}"
        pipe = self.redis.pipeline()
        pipe.incrby(key, count)
        pipe.expire(key, 3600)
        pipe.execute()

    # -- internals --------------------------------------------------------------------------------
    def _recent_line(self, epoch: str | None) -> _Line:
        """The line as this process saw it within ``LINE_MAX_AGE_SECONDS``, else freshly advanced.

        A different ``epoch`` than the one seen (a ticket from after Redis lost the queue, or one
        from before) always asks Redis, so a cached view never expires a good ticket or token.
        """
        line = self._line
        if line is None or line.epoch != epoch or time.monotonic() - line.at > self.LINE_MAX_AGE_SECONDS:
            _, line, _ = self._advance(direct=False)
        return line

    def _outflow_now(self) -> int:
        cached = self._outflow
        if cached is not None and time.monotonic() - cached[0] < self.OUTFLOW_MAX_AGE_SECONDS:
            return cached[1]
        rate = self.outflow_per_minute()
        self._outflow = (time.monotonic(), rate)
        return rate

    def _eta(self, position: int) -> int:
        return int(math.ceil(position * 60 / max(1, self._outflow_now())))

    def _advance(self, *, direct: bool) -> tuple[int, _Line, Mode]:
        s = self.settings
        args = [int(time.time() * 1000), self._outflow_now(), max(1, s.admission_burst),
                s.admission_active_checkouts, s.admission_session_seconds * 1000,
                "1" if direct else "0", f"d{uuid.uuid4().hex}", uuid.uuid4().hex[:12]]
        asked_at = time.monotonic()  # the answer is at least this fresh
        outcome, head, tail, epoch, mode = self._call(self._script, keys=self.keys, args=args)
        line = _Line(head=int(head), tail=int(tail), epoch=epoch.decode(), mode=Mode(mode.decode()),
                     at=asked_at)
        # Threads of one process race here: never let an older answer replace a newer one of the same
        # line, or a buyer just told "admitted" could next be told "position 1".
        seen = self._line
        if seen is None or seen.epoch != line.epoch or seen.head <= line.head:
            self._line = line
        return int(outcome), line, line.mode

    @staticmethod
    def _call(fn, *args, **kwargs):
        """Admission fails closed: without Redis we can't keep the line fair, so we say "come back"."""
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise AdmissionUnavailable(
                "The waiting room is briefly unavailable; please retry shortly.") from exc
