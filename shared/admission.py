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


class SalesPaused(DomainError):
    code = "sales_paused"


class InvalidAdmission(DomainError):
    code = "invalid_admission"


@dataclass(frozen=True)
class Admitted:
    """Let through now, holding the active-checkout slot ``member`` (see :meth:`AdmissionController.release`)."""

    member: str | None = None


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


# Retry-After a queue poll is told while sales are paused (nothing moves, so no ETA to follow).
MAX_RETRY_AFTER_SECONDS = 30


def retry_after_seconds(eta_seconds: int, cap: int) -> int:
    """When a not-yet-admitted buyer should ask again: a quarter of their ETA, at least 2 s, at most
    ``cap`` (ADMISSION_MAX_RETRY_AFTER_SECONDS). Near the head that is every few seconds, so the position a
    buyer sees is fresh when it matters; far back, where nothing a poll could say changes the wait, they
    ask rarely, which is most of what people in line cost (docs/capacity.md). A ticket that hasn't polled
    for ADMISSION_ABANDON_SECONDS (more than twice the cap, checked in Settings) is taken for abandoned."""
    return min(cap, max(2, eta_seconds // 4))

# KEYS: tail, head, tokens, stamp, active, mode, epoch, seen, client, address, issued
# ARGV: now_ms, rate_per_minute, burst, active_cap, session_ms, want (1 direct or a place, 2 a place
#       only, 0 neither), member, new_epoch,
#       abandon_ms, ticket_seconds, now_s, tickets_per_address, then the ticket numbers this process saw
#       polling since its last call.
# Returns {outcome, head, tail, epoch, mode, ticket, issued_at} where outcome is 1 = admitted directly,
# 0 = not (and ``ticket``, issued at ``issued_at``, is the caller's place if want was 1 or 2), 2 = mode
# forbids movement. The queue's epoch comes back with every call (made here if Redis has none), so a
# decision or a poll is one round trip.
#
# ``seen`` (ticket number -> when it last polled, ms) is how the line tells a waiting buyer from a
# ticket nobody holds any more: when the head reaches a ticket not seen within abandon_ms, it moves over
# it without spending an admission on it (its holder, if they do come back, is told to join again).
# ``client`` holds the caller's live ticket ("<n>:<issued_at>"): a client asking again while its ticket
# still waits gets that same ticket back, never a second place in line. A client is a browser (its
# Client-Id) at an address; ``address`` holds the live tickets of every client at that address, at most
# tickets_per_address of them: beyond that, a new client at the address shares its newest ticket (so
# junk from one address can't fill the line, and buyers behind one address still get places of their
# own up to the bound). ``issued`` (ticket number -> "<n>:<issued_at s>", scored by the number) holds the
# tickets past the head with when each was issued, trimmed as the head moves: the oldest waiter's age is
# read from its lowest entries (shared/services/observe.py), one O(log n) step per ticket here.
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
local want_direct = ARGV[6] ~= '0'  -- '1': admit directly if the line is empty, else a place; '2': a place
local abandon = tonumber(ARGV[9])
local mode = redis.call('GET', KEYS[6]) or 'auto'
local tail = tonumber(redis.call('GET', KEYS[1]) or '0')
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
for i = 13, #ARGV do
  if tonumber(ARGV[i]) > head then redis.call('ZADD', KEYS[8], now, ARGV[i]) end
end
local function place()
  local live = redis.call('GET', KEYS[9])
  if live then
    local n, at = string.match(live, '^(%d+):(%d+)$')
    if n and tonumber(n) > head then return tonumber(n), tonumber(at) end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', head)
  if redis.call('ZCARD', KEYS[10]) >= tonumber(ARGV[12]) then
    local newest = redis.call('ZREVRANGE', KEYS[10], 0, 0)[1]
    local n, at = string.match(newest, '^(%d+):(%d+)$')
    return tonumber(n), tonumber(at)
  end
  tail = redis.call('INCR', KEYS[1])
  local held = tail .. ':' .. ARGV[11]
  redis.call('ZADD', KEYS[8], now, tail)
  redis.call('SET', KEYS[9], held, 'EX', tonumber(ARGV[10]))
  redis.call('ZADD', KEYS[10], tail, held)
  redis.call('EXPIRE', KEYS[10], tonumber(ARGV[10]))
  redis.call('ZADD', KEYS[11], tail, held)
  return tail, tonumber(ARGV[11])
end
if mode ~= 'auto' then
  if want_direct and mode == 'queue_all' then
    local n, at = place()
    return {2, head, tail, epoch, mode, n, at}
  end
  return {2, head, tail, epoch, mode, 0, 0}
end
local tokens = tonumber(redis.call('GET', KEYS[3]) or tostring(burst))
local stamp = tonumber(redis.call('GET', KEYS[4]) or tostring(now))
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate / 60000.0)
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - session)
local room = cap - redis.call('ZCARD', KEYS[5])
local allowed = math.floor(math.min(tokens, room))
local admitted, skipped = 0, 0
while head < tail and admitted < allowed and skipped < 5000 do
  head = head + 1
  local seen = tonumber(redis.call('ZSCORE', KEYS[8], head))
  redis.call('ZREM', KEYS[8], head)
  if seen and seen >= now - abandon then
    redis.call('ZADD', KEYS[5], now, 't' .. head)
    admitted = admitted + 1
  else
    skipped = skipped + 1
  end
end
if admitted > 0 or skipped > 0 then
  tokens = tokens - admitted
  redis.call('SET', KEYS[2], head)
  redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', head)
end
local outcome, n, at = 0, 0, 0
if want_direct then
  if ARGV[6] == '1' and tail == head and tokens >= 1 and room - admitted >= 1 then
    tokens = tokens - 1
    redis.call('ZADD', KEYS[5], now, ARGV[7])
    outcome = 1
  else
    n, at = place()
  end
end
redis.call('SET', KEYS[3], tostring(tokens))
redis.call('SET', KEYS[4], tostring(now))
return {outcome, head, tail, epoch, mode, n, at}
"""

# Giving a direct admission back (its create failed): the active slot ARGV[1], and the outflow token it
# took, up to the burst ARGV[2]. KEYS: active, tokens.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local tokens = tonumber(redis.call('GET', KEYS[2]) or ARGV[2])
  redis.call('SET', KEYS[2], tostring(math.min(tonumber(ARGV[2]), tokens + 1)))
end
return 1
"""

# Collecting an admission for ticket ARGV[1]: 1 when the line admitted it, 0 once it was spent on an
# order, -1 when the line moved over it as abandoned (or its admission lapsed unused with the session
# window): its holder joins the line again, at the back. KEYS: spent (bitmap, this epoch), active.
_COLLECT = """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('ZSCORE', KEYS[2], 't' .. ARGV[1]) then return 1 end
return -1
"""


# Spending the admission of ticket ARGV[1] for the create identified by ARGV[2] (a digest of the buyer's
# e-mail and Idempotency-Key), the record kept ARGV[3] seconds: 1 spent (or already spent by this same
# create: a proxy or client retry of it must not lose the buyer the place they waited for), 0 spent by
# another create. ``holders`` counts the requests of that create in flight, so only the last one to fail
# gives the admission back. KEYS: spent (bitmap, this epoch), spender (hash, this ticket).
_SPEND = """
local by = redis.call('HGET', KEYS[2], 'by')
if by then
  if by ~= ARGV[2] then return 0 end
  redis.call('HINCRBY', KEYS[2], 'holders', 1)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
  return 1
end
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('SETBIT', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], 'by', ARGV[2], 'holders', 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# A create that spent ticket ARGV[1]'s admission (as ARGV[2], see _SPEND) failed before making an order:
# one holder fewer; the last one gives the admission back. Another create's spend is never undone.
_UNSPEND = """
if redis.call('HGET', KEYS[2], 'by') ~= ARGV[2] then return 0 end
if redis.call('HINCRBY', KEYS[2], 'holders', -1) > 0 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SETBIT', KEYS[1], ARGV[1], 0)
return 1
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs small JSON claims with HMAC-SHA256; a different ``purpose`` can't be swapped in.

    Its key is derived from SECRET_KEY for the waiting room alone (nothing else is signed with it), so
    tickets and admission tokens prove nothing anywhere else.
    """

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), b"meterai waiting room v1", hashlib.sha256).digest()

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


def _spender(buyer: str, idempotency_key: str) -> str:
    """Which create spent an admission, as the order's Idempotency-Key scope (e-mail and key) names it;
    a digest, so Redis holds no e-mail address."""
    return hashlib.sha256(f"{buyer}\n{idempotency_key}".encode()).hexdigest()[:32]


class AdmissionController:
    # A queue poll may answer from what this process learnt of the line this recently instead of asking
    # Redis again. Thousands of buyers poll every few seconds at the peak; with this, each web process
    # runs the advance at most a few times a second whatever the polling rate, and a position is at
    # most this stale (a fraction of one admission at any outflow we run).
    LINE_MAX_AGE_SECONDS = 0.2
    # The measured outflow moves by the minute; re-reading it more often only costs round trips.
    OUTFLOW_MAX_AGE_SECONDS = 5.0
    # How long a ticket admitted at once by take_ticket holds its active-checkout slot before its create
    # spends the token (then the whole session window): the upload follows within seconds.
    PROVISIONAL_SLOT_SECONDS = 120
    # Polls this process saw are reported with its next advance; at most this many at once.
    MAX_SEEN_PER_CALL = 5000

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.signer = Signer(settings.secret_key)
        p = f"{settings.redis_key_prefix}adm:"
        self.keys = [f"{p}tail", f"{p}head", f"{p}tokens", f"{p}stamp", f"{p}active", f"{p}mode", f"{p}epoch",
                     f"{p}seen"]
        self._active_key = self.keys[4]
        self.issued_key = f"{p}issued"
        self._client_prefix = f"{p}client:"
        self._address_prefix = f"{p}address:"
        self._spent_prefix = f"{p}spent:"
        self._spender_prefix = f"{p}spender:"
        self._stats_prefix = f"{settings.redis_key_prefix}stats:stamped:"
        self._script = client.register_script(_ADVANCE)
        self._collect = client.register_script(_COLLECT)
        self._release = client.register_script(_RELEASE)
        self._spend = client.register_script(_SPEND)
        self._unspend = client.register_script(_UNSPEND)
        self._line: _Line | None = None
        self._outflow: tuple[float, int] | None = None
        self._seen: set[int] = set()

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
    def admit_or_queue(self, address: str, client: str = "-") -> Admitted | Queued:
        """Admit a new checkout now if the outflow allows and nobody is waiting; else a place in line.

        ``address`` is where the request came from, ``client`` the browser's own id (``Client-Id``; "-"
        when it sends none). A client whose ticket is still waiting gets that ticket again (same place),
        not a second one; an address holds at most ``ADMISSION_TICKETS_PER_ADDRESS`` places. An
        :class:`Admitted` holds an active-checkout slot: :meth:`release` gives it back if the create
        then fails.
        """
        member = f"d{uuid.uuid4().hex}"
        outcome, line, mode, number, issued_at = self._advance(direct=True, member=member, address=address,
                                                               client=client)
        if mode == Mode.PAUSED:
            raise SalesPaused("Ticket sales are paused; please come back later.")
        if outcome == 1:
            return Admitted(member=member)
        position = max(1, number - line.head)
        ticket = self.signer.sign("ticket", {"n": number, "e": line.epoch, "t": issued_at})
        return Queued(ticket=ticket, position=position, eta_seconds=self._eta(position))

    def take_ticket(self, address: str, client: str = "-") -> QueueStatus | Queued:
        """A place in line before any upload (API.md: a ticket without a document), as ``admit_or_queue``
        gives one (the same per-client and per-address rules). When the line is empty and the outflow
        allows, the ticket is admitted at once and the answer carries its admission token, so a buyer
        at a quiet hour uploads right away; otherwise they wait with the ticket and upload when let in,
        and the arrivals above the outflow cost the web a few hundred bytes each, not an upload."""
        _, line, mode, number, issued_at = self._advance(direct=True, ticket_only=True, address=address,
                                                         client=client)
        if mode == Mode.PAUSED:
            raise SalesPaused("Ticket sales are paused; please come back later.")
        ticket = self.signer.sign("ticket", {"n": number, "e": line.epoch, "t": issued_at})
        if number == line.head + 1:  # first in line: let the line move now rather than at the next poll
            self._line = None
        status = self.status(ticket)
        if status.admitted:
            # Nothing is uploaded yet: the active-checkout slot is held only PROVISIONAL_SLOT_SECONDS
            # unless the create spends the token (spend_token renews it), so a request without a body
            # can't hold a checkout's place for the whole session window.
            expires_early = (time.time() - self.settings.admission_session_seconds
                             + self.PROVISIONAL_SLOT_SECONDS) * 1000
            self._call(self.redis.zadd, self._active_key, {f"t{number}": int(expires_early)}, xx=True)
            return status
        return Queued(ticket=ticket, position=status.position, eta_seconds=status.eta_seconds)

    def release(self, admitted: Admitted) -> None:
        """Give a direct admission back, its active slot and its share of the outflow: the create it was
        for did not happen. Best effort (the slot lapses with the session window anyway)."""
        if admitted.member is None:
            return
        try:
            self._release(keys=[self._active_key, self.keys[2]],
                          args=[admitted.member, max(1, self.settings.admission_burst)])
        except redis.RedisError:
            pass

    def _ticket_claims(self, ticket: str) -> dict:
        claims = self.signer.verify("ticket", ticket)
        if claims is None or not isinstance(claims.get("n"), int):
            raise InvalidAdmission("This queue ticket is not valid.", code="invalid_ticket")
        if time.time() - claims.get("t", 0) > self.settings.ticket_seconds:
            raise InvalidAdmission("This queue ticket has expired; please start again.",
                                   code="ticket_expired")
        return claims

    def _waiting(self, number: int, line: _Line, outflow: int | None = None) -> QueueStatus | None:
        """The answer for ticket ``number`` while it waits behind ``line``'s head; None once it is at the head
        (collecting the admission is the caller's). ``outflow``: the rate to compute the ETA with (else
        this process's, read again from Redis when it is stale)."""
        self._seen.add(number)  # reported with this process's next advance: its holder is still here
        if line.mode == Mode.PAUSED:  # the ticket keeps its place; nobody is let in meanwhile
            raise SalesPaused("Ticket sales are paused; your place in the queue is kept. Please check "
                              "again later.")
        position = max(0, number - line.head)
        if position > 0:
            eta = self._eta(position) if outflow is None else int(math.ceil(position * 60 / max(1, outflow)))
            return QueueStatus(position=position, eta_seconds=eta, admitted=False)
        return None

    def status_if_known(self, ticket: str, slack: float = 0.0) -> QueueStatus | None:
        """:meth:`status` when it can be answered without a Redis round trip, else None (ask :meth:`status`).

        For a server that answers polls on an event loop (web/pollserver.py): most polls are a ticket still
        waiting behind a line this process saw within ``LINE_MAX_AGE_SECONDS`` and an outflow it read within
        ``OUTFLOW_MAX_AGE_SECONDS``, which need only the ticket's HMAC; the rest (a stale look at the line,
        another epoch, the head reached) wait on Redis and belong on a thread. ``slack`` seconds more of
        age are accepted (the poll server's answer while a fresher look is already being fetched). Raises
        as :meth:`status` does for a ticket that isn't valid or expired, and while sales are paused."""
        claims = self._ticket_claims(ticket)
        line, outflow, now = self._line, self._outflow, time.monotonic()
        if (line is None or line.epoch != claims.get("e") or now - line.at > self.LINE_MAX_AGE_SECONDS + slack
                or outflow is None or now - outflow[0] >= self.OUTFLOW_MAX_AGE_SECONDS + slack):
            return None
        number = int(claims["n"])
        if number <= line.head and line.mode != Mode.PAUSED:
            return None  # at the head: the admission is collected in Redis
        return self._waiting(number, line, outflow[1])  # the rate just checked: no read of Redis here

    def status(self, ticket: str) -> QueueStatus:
        claims = self._ticket_claims(ticket)
        number = int(claims["n"])
        line = self._recent_line(claims.get("e"))
        if claims.get("e") != line.epoch:
            raise InvalidAdmission("This queue ticket has expired; please start again.",
                                   code="ticket_expired")
        waiting = self._waiting(number, line)
        if waiting is not None:
            return waiting
        collected = self._call(self._collect, keys=[self._spent_key(claims["e"]), self._active_key],
                               args=[number, int(time.time() * 1000)])
        if collected == 0:
            raise InvalidAdmission("This queue ticket was already used for an order; to buy another stamp, "
                                   "start again.", code="ticket_used")
        if collected < 0:
            raise InvalidAdmission("This queue ticket stopped checking in and lost its place; please join "
                                   "the queue again.", code="ticket_abandoned")
        token = self.signer.sign("admission", {
            "n": number, "e": claims["e"], "x": int(time.time()) + self.settings.admission_token_seconds})
        return QueueStatus(position=0, eta_seconds=0, admitted=True, admission_token=token)

    def check_token(self, token: str) -> dict:
        """Verify an admission token without spending it (see :meth:`spend_token`)."""
        claims = self.signer.verify("admission", token)
        if claims is None or not isinstance(claims.get("n"), int):
            raise InvalidAdmission("This admission token is not valid.")
        line = self._recent_line(claims.get("e"))
        if claims.get("x", 0) < time.time() or claims.get("e") != line.epoch:
            raise InvalidAdmission("This admission token has expired; please queue again.",
                                   code="admission_expired")
        if line.mode == Mode.PAUSED:
            raise SalesPaused("Ticket sales are paused; please come back later.")
        return claims

    def spend_token(self, claims: dict, buyer: str, idempotency_key: str) -> None:
        """Single use, for the ticket's whole life: the first create to spend a ticket's admission wins;
        any other (another token polled for the same ticket, the same token again) is refused. The same
        create again (same ``buyer`` e-mail and ``idempotency_key``: nginx retrying a POST on another node
        after the first timed out, a client retrying a lost answer) spends it successfully again: its
        Idempotency-Key then finds or makes the one order. Spent tickets are bits of one bitmap per
        epoch, each with a record of the create that spent it, kept as long as a ticket can live."""
        spent = self._call(self._spend, keys=self._spend_keys(claims),
                           args=[int(claims["n"]), _spender(buyer, idempotency_key), self._spent_ttl()])
        if not spent:
            raise InvalidAdmission("This admission token was already used.", code="admission_used")
        # A slot held provisionally (take_ticket's admission at once) is the checkout's for the whole
        # session window from now on; XX: a slot that already lapsed is not made again.
        try:
            self.redis.zadd(self._active_key, {f"t{int(claims['n'])}": int(time.time() * 1000)}, xx=True)
        except redis.RedisError:
            pass  # the slot keeps its shorter life; the create goes on

    def unspend_token(self, claims: dict, buyer: str, idempotency_key: str) -> None:
        """The create that spent this admission failed before making an order: the buyer may retry with
        the same token (once no other request of the same create still holds it). Best effort (a Redis
        that fails now just means queueing again)."""
        try:
            self._unspend(keys=self._spend_keys(claims), args=[int(claims["n"]), _spender(buyer, idempotency_key)])
        except redis.RedisError:
            pass

    def record_stamped(self, count: int = 1) -> None:
        """Called by stamping workers: the measured throughput the default outflow follows."""
        key = f"{self._stats_prefix}{int(time.time() // 60)}"
        pipe = self.redis.pipeline()
        pipe.incrby(key, count)
        pipe.expire(key, 3600)
        pipe.execute()

    # -- internals --------------------------------------------------------------------------------
    def _spent_key(self, epoch: object) -> str:
        return f"{self._spent_prefix}{epoch}"

    def _spend_keys(self, claims: dict) -> list[str]:
        return [self._spent_key(claims["e"]), f"{self._spender_prefix}{claims['e']}:{int(claims['n'])}"]

    def _spent_ttl(self) -> int:
        return self.settings.ticket_seconds + self.settings.admission_token_seconds + 60

    def _recent_line(self, epoch: str | None) -> _Line:
        """The line as this process saw it within ``LINE_MAX_AGE_SECONDS``, else freshly advanced.

        A different ``epoch`` than the one seen (a ticket from after Redis lost the queue, or one
        from before) always asks Redis, so a cached view never expires a good ticket or token.
        """
        line = self._line
        if line is None or line.epoch != epoch or time.monotonic() - line.at > self.LINE_MAX_AGE_SECONDS:
            _, line, _, _, _ = self._advance(direct=False)
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

    def _advance(self, *, direct: bool, member: str = "", address: str = "-", client: str = "-",
                 ticket_only: bool = False) -> tuple[int, _Line, Mode, int, int]:
        s = self.settings
        seen, self._seen = self._seen, set()
        reported = sorted(seen)[-self.MAX_SEEN_PER_CALL:]
        now = time.time()
        args = [int(now * 1000), self._outflow_now(), max(1, s.admission_burst),
                s.admission_active_checkouts, s.admission_session_seconds * 1000,
                ("2" if ticket_only else "1") if direct else "0", member, uuid.uuid4().hex[:12],
                s.admission_abandon_seconds * 1000, s.ticket_seconds, int(now),
                max(1, s.admission_tickets_per_address), *reported]
        keys = [*self.keys, f"{self._client_prefix}{address}|{client}", f"{self._address_prefix}{address}",
                self.issued_key]
        asked_at = time.monotonic()  # the answer is at least this fresh
        try:
            outcome, head, tail, epoch, mode, number, issued_at = self._call(self._script, keys=keys, args=args)
        except AdmissionUnavailable:
            self._seen |= seen  # report them next time
            raise
        line = _Line(head=int(head), tail=int(tail), epoch=epoch.decode(), mode=Mode(mode.decode()),
                     at=asked_at)
        # Threads of one process race here: never let an older answer replace a newer one of the same
        # line, or a buyer just told "admitted" could next be told "position 1".
        seen_line = self._line
        if seen_line is None or seen_line.epoch != line.epoch or seen_line.head <= line.head:
            self._line = line
        return int(outcome), line, line.mode, int(number), int(issued_at)

    @staticmethod
    def _call(fn, *args, **kwargs):
        """Admission fails closed: without Redis we can't keep the line fair, so we say "come back"."""
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise AdmissionUnavailable(
                "The waiting room is briefly unavailable; please retry shortly.") from exc
