"""Settings, twelve-factor style: every value comes from the environment and has a safe default.

One frozen :class:`Settings` is built per process (:func:`get_settings`) so the web app, the workers, the
CLI and the tests all read the same names. Tests build their own with :func:`load_settings` and an
explicit mapping instead of touching ``os.environ``.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_DATA_DIR = ".data"
DEV_SECRET_KEY = "meterai-dev-secret-change-me"
# The stand-in gateway's own server key. Midtrans' sandbox keys start with "SB-": a deployment that takes
# payments with one takes no money at all, and hands out stamps for free.
DEV_GATEWAY_SERVER_KEY = "SB-Mid-server-meterai-dev"
SANDBOX_KEY_PREFIX = "SB-"
# The organisation named in every certificate of the development PKI (made by SIGNING_DEV_PKI=1); a root
# certificate naming it is refused outside development, even when copied to a configured path.
DEV_PKI_ORGANIZATION = "meterai (development)"
MIN_SECRET_LENGTH = 32
# The sender of buyers' e-mails on a development machine when MAIL_FROM is unset (.invalid: no real domain
# can receive replies to it); production must set MAIL_FROM.
DEV_MAIL_FROM = "meterai (pengembangan) <noreply@meterai.invalid>"
SMTP_SECURITY_MODES = ("none", "starttls", "tls")


class UnsafeSettings(RuntimeError):
    """The settings would run production on a development default; the message lists every problem."""


_RATE_LIMIT = re.compile(r"[0-9]{1,9}(/[1-9][0-9]{0,6})?")  # what shared.ratelimit.Limit.parse reads


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/meterai"
    # 1: DATABASE_URL leads to a pooler in transaction mode (PgBouncer), so psycopg never prepares
    # statements: a prepared statement lives on one server connection, and the pooler may give the next
    # transaction another (PgBouncer before 1.21 has no prepared-statement support at all).
    database_pooled: int = 0
    # Every pooled connection is replaced after DATABASE_MAX_LIFETIME_SECONDS (a moved DNS name, server
    # memory), idle ones are closed after DATABASE_MAX_IDLE_SECONDS: keep it under the idle cut-offs of
    # the NATs, balancers and poolers in between (PgBouncer's client_idle_timeout), so none is dropped
    # silently under us. Either way, every connection is checked as it is handed out (shared/db).
    database_max_lifetime_seconds: float = 30 * 60.0
    database_max_idle_seconds: float = 300.0
    # How long a request or task waits for a pooled connection before it is "overloaded": the web answers
    # 503 with Retry-After, a task retries. Short: a buyer is told to come back in seconds, not held.
    database_pool_timeout_seconds: float = 3.0
    # A database host gone without a word (a failover that took its address away, a cut in the network)
    # answers nothing at all: no refusal, no reset. Without bounds a connection attempt waits for the
    # kernel's SYN retries (about 2 minutes) and a statement sent on an open connection for TCP's
    # retransmissions (about 15 minutes: tcp_retries2), holding a web thread or a task that long.
    # DATABASE_CONNECT_TIMEOUT_SECONDS bounds the first (libpq connect_timeout, whole seconds, at least 2),
    # DATABASE_TCP_USER_TIMEOUT_SECONDS the second (libpq tcp_user_timeout: how long sent data may stay
    # unacknowledged, so a slow query on a live server is never cut by it); TCP keepalives find an idle
    # pooled connection's dead peer in 30-40 s. A value named in DATABASE_URL wins over these. Behind
    # PgBouncer they bound the hop to PgBouncer; the hop to PostgreSQL is PgBouncer's (docs/deploy.md).
    database_connect_timeout_seconds: int = 5
    database_tcp_user_timeout_seconds: float = 10.0
    # Where `meterai migrate` connects; empty means DATABASE_URL. Point it at PostgreSQL itself when
    # DATABASE_URL is a pooler: a migration's DDL holds one server connection for its whole run and must
    # not meet the pooler's query_timeout or take a slot from the traffic.
    migrate_database_url: str = ""
    # Our own Redis clients (waiting room, rate limits, status cache, CLI): redis://, rediss:// (TLS) or
    # redis+sentinel://host1:26379,host2:26379/master-name/0 (the primary as Sentinel reports it; see
    # shared/redisconn.py). Production Redis must run with maxmemory-policy noeviction.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker, in the same forms; empty: REDIS_URL. A separate server (or Sentinel master) keeps
    # a waiting-room storm from slowing the broker.
    broker_url: str = ""
    # The Sentinels' own password (requirepass on the Sentinels), if they have one; the data nodes'
    # credentials go in the URLs.
    redis_sentinel_password: str = ""
    # Prefix for every Redis key we own (broker queues included), so several deployments or test
    # sessions can share one Redis without touching each other's keys.
    redis_key_prefix: str = "meterai:"
    data_dir: str = DEFAULT_DATA_DIR
    document_dir: str = ""  # defaults to <data_dir>/documents

    # The document store (shared/store/): empty or file:///abs/path for the filesystem (empty: DOCUMENT_DIR,
    # or <data_dir>/documents), s3://bucket/optional/prefix for an S3-compatible server (several
    # machines). The S3 settings below matter only then.
    document_store_url: str = ""
    # Empty: AWS itself. Outside development a plain-http endpoint must be on this machine (a loopback
    # address): over the network buyers' documents and our keys' signatures would travel readable.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # Both empty: boto3's own credential chain (environment, shared files, instance/container role).
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # botocore's request_checksum_calculation / response_checksum_validation. "when_required" (the
    # default) sends no new CRC checksums, which several S3-compatible servers reject; we send Content-MD5
    # and check our own SHA-256 anyway. "when_supported" turns botocore's on.
    s3_checksums: str = "when_required"
    # Seconds; small, so a store that is down turns into a quick 503 "come back", not a hung request.
    s3_connect_timeout: float = 2.0
    s3_read_timeout: float = 10.0
    # botocore's attempts per call (1 = no retry): our tasks retry on their own, with backoff.
    s3_max_attempts: int = 2
    # 1: stamped files are put with If-None-Match: * (the server refuses to overwrite). 0: for servers
    # without conditional writes, HEAD then PUT (racy between two writers of one key).
    s3_conditional_writes: int = 1
    # "path", "virtual" or "auto"; empty: path-style with S3_ENDPOINT_URL, botocore's choice on AWS.
    s3_addressing_style: str = ""
    public_base_url: str = "http://127.0.0.1:8000"
    # 1 on a developer's machine, in tests and drills (./dev, the test fixtures and the drills set it):
    # only then may the development defaults below (secret key, development CA, stand-in gateway and its
    # sandbox key, plain-http URLs) be used. 0, the default, makes web and workers refuse to start on any
    # of them (:func:`refuse_unsafe`), so production can't run on one by accident.
    development: int = 0
    # 1: ./dev up, ./dev test, the test fixtures and the drills start private PostgreSQL and Redis servers
    # (under DATA_DIR) even when DATABASE_URL / REDIS_URL answer, so a run never touches shared servers.
    # Only those tools read it; the web and workers use whatever DATABASE_URL / REDIS_URL say.
    private_services: int = 0
    # The root of every key we derive (waiting-room tickets and admission tokens). The default is for
    # development only; production must set SECRET_KEY (at least 32 characters) or refuses to start.
    secret_key: str = DEV_SECRET_KEY

    # Prices in integer rupiah: the stamp's face value plus our service fee.
    stamp_face_value: int = 10_000
    service_fee: int = 2_500

    # Documents
    max_document_bytes: int = 2 * 1024 * 1024
    max_pages: int = 500
    stamp_size: float = 100.0
    # Preflight runs in a sandbox child process with these bounds (shared/sandbox/): wall-clock
    # seconds, well under the task time limit so the task always finishes with an answer, and bytes of
    # address space on top of the worker's own. A valid 500-page document takes well under a second and
    # ~100 MB.
    preflight_timeout_seconds: float = 20.0
    preflight_memory_bytes: int = 512 * 1024 * 1024
    # Each worker process reuses its sandbox child for many accepted documents: a child is replaced
    # after this many, or once its memory has grown by more than this many bytes since it was forked
    # (and after any rejection, timeout or crash).
    preflight_child_max_documents: int = 200
    preflight_child_max_growth_bytes: int = 64 * 1024 * 1024

    # Payment gateway (Midtrans-style). The stand-in listens on gateway_port.
    gateway_provider: str = "midtrans"
    gateway_url: str = "http://127.0.0.1:8001"
    gateway_server_key: str = DEV_GATEWAY_SERVER_KEY
    gateway_timeout_seconds: float = 5.0
    gateway_port: int = 8001
    # Where the stand-in gateway posts its notifications (our own endpoint).
    notification_url: str = "http://127.0.0.1:8000/api/v1/payments/notifications"
    # Circuit breaker per worker process: this many consecutive unavailable answers open it; while
    # open every call fails at once; after the cool-down one probe call may close it again.
    gateway_breaker_threshold: int = 5
    gateway_breaker_cooldown_seconds: float = 30.0
    # The stand-in gateway keeps its own state in its own schema; empty means DATABASE_URL.
    standin_database_url: str = ""
    standin_schema: str = "standin"
    # Seconds between the stand-in's attempts to deliver one notification, comma-separated (it gives up,
    # and logs it, after the last); `python -m shared.devtools.standin` reads it (--notification-retry-delays
    # overrides it for one run).
    standin_notification_retry_delays: str = "0.5,2,5"

    # Deadlines and leases, in seconds.
    stamp_deadline_seconds: int = 6 * 3600
    # Longer than the task time limit: a task still running always holds a live lease.
    lease_seconds: int = 180
    payment_timeout_seconds: int = 24 * 3600
    # An order still `created` this long after it was made (checkout retries ran out, or its message was
    # lost) is expired with a reason the buyer can read, instead of "being checked" for ever; longer than
    # the checkout task's whole retry budget.
    checkout_deadline_seconds: int = 3600
    # Every gateway transaction we open is polled until the gateway calls it final and for this long
    # after (a bank transfer can settle after its expiry), at intervals doubling up to
    # payment_watch_max_interval_seconds once final (RECONCILE_MAX_INTERVAL_SECONDS before). Once final
    # only a late settlement can change anything, so a final transaction is asked twice more (at 24 and
    # 48 h): at a million orders a day, each poll per transaction costs about 12 status queries a second.
    payment_watch_seconds: int = 48 * 3600
    payment_watch_max_interval_seconds: int = 24 * 3600

    # Retries: exponential backoff with full jitter, capped.
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    # How often each kind of task is retried before it takes its final outcome (workers/tasks/base.py):
    # checkout → the order expires; a notification → left to the payment watch; a gateway poll → its
    # next check; stamping → the sweep refunds at the deadline; a refund → the redrive tries again.
    checkout_max_retries: int = 10
    notification_max_retries: int = 12
    payment_check_max_retries: int = 5
    stamp_max_retries: int = 8
    refund_max_retries: int = 12

    # Periodic work.
    sweep_interval_seconds: float = 60.0
    redrive_interval_seconds: float = 60.0
    sweep_batch_size: int = 500
    # Work newer than this is left to its own message; redrive only picks up what looks lost.
    redrive_grace_seconds: int = 30
    # Payment reconciliation: an order still awaiting payment this long after its payment opened is
    # polled at the gateway (its notification may never come), again after doubling intervals capped
    # at reconcile_max_interval_seconds; at payment_timeout_seconds it is expired (gateway first).
    reconcile_after_seconds: int = 600
    reconcile_max_interval_seconds: int = 3600
    reconcile_interval_seconds: float = 60.0
    expire_unpaid_interval_seconds: float = 60.0
    reconcile_batch_size: int = 500

    task_time_limit_seconds: int = 120

    # Admission control (the waiting room). 0 per minute means "follow measured stamping throughput".
    admission_per_minute: int = 0
    admission_min_per_minute: int = 600
    admission_burst: int = 50
    admission_active_checkouts: int = 5000
    admission_session_seconds: int = 600
    admission_token_seconds: int = 600
    ticket_seconds: int = 6 * 3600
    # A ticket that hasn't polled its place for this long is taken for abandoned: the line moves over it
    # without spending an admission on it, and its holder, if they come back, joins again. More than twice
    # the longest Retry-After a waiting poll is given (below), so a buyer who polls as told is never
    # skipped; near the head, where it matters, polls come every few seconds.
    admission_abandon_seconds: int = 300
    # The longest Retry-After a waiting buyer is told (a quarter of their ETA up to this;
    # shared/admission.retry_after_seconds): far back in line, polls every 2 minutes instead of every 30 s.
    admission_max_retry_after_seconds: int = 120
    # Places in line one address may hold at once (each browser, by its Client-Id, gets its own up to
    # this; beyond it, new ones share the newest): buyers behind one carrier NAT or office address aren't
    # sent round the line again, and one address can't fill it with junk.
    admission_tickets_per_address: int = 8
    # Per-client rate limits on write endpoints ("<count>/<seconds>").
    rate_limit_create: str = "20/60"
    rate_limit_verify: str = "30/60"
    rate_limit_notifications: str = "600/60"
    # Seconds a buyer's order-status answer may be served from Redis (shared/statuscache.py); every
    # status change drops it at once, this only bounds a change Redis missed. 0 disables the cache.
    status_cache_seconds: int = 10
    # How many reverse proxies in front of us set X-Forwarded-For (0: trust the socket's address).
    proxy_hops: int = 0
    # Bearer token for the ops endpoints; empty disables them.
    ops_token: str = ""
    # Prometheus metrics (shared/metrics.py). A worker node serves its own on this port (0: none; each node
    # on a machine needs its own port); web nodes serve theirs at GET /metrics (behind OPS_TOKEN). The
    # multiprocess directory is a base (empty: <DATA_DIR>/metrics): each node counts in a folder of its
    # own below it. shared/metrics.py reads it from the environment itself, because prometheus-client
    # decides on multiprocess mode as it is imported.
    metrics_port: int = 0
    metrics_bind_host: str = "127.0.0.1"
    prometheus_multiproc_dir: str = ""

    # Signing stamped documents (X.509, PAdES B-B; an RSA or ECDSA issuer key). Each item is a file
    # (SIGNING_*_PATH; empty paths default to <data_dir>/pki/) or PEM text in the environment
    # (SIGNING_*_PEM, for platforms that inject secrets as variables; a path and a PEM for the same item
    # is refused), the same on every node (shared/stamping/key_material.py). Production only loads them
    # (missing ones are an error). With signing_dev_pki=1 the tooling (./dev up, the test fixtures, the
    # drills) makes a development root CA and issuer there before the processes start, when none of the
    # three files exists; web and workers refuse to start with it outside development.
    signing_key_path: str = ""
    signing_cert_path: str = ""
    signing_ca_cert_path: str = ""
    signing_key_pem: str = ""
    signing_cert_pem: str = ""
    signing_ca_cert_pem: str = ""
    signing_key_passphrase: str = ""
    signing_dev_pki: int = 1

    # E-mail to buyers (shared/services/mail.py, sent by the `mail` worker group). SMTP_SECURITY: "none"
    # (plain SMTP: a relay on this machine), "starttls" (upgrade on connect, usually port 587) or "tls"
    # (TLS from the first byte, usually 465); certificates are verified. Outside development plain SMTP
    # is refused to any other machine: every e-mail carries a link with an access token. Production must
    # name its server (SMTP_HOST; 127.0.0.1 for a relay on this machine) and MAIL_FROM ("Name <address>");
    # on a development machine an empty SMTP_HOST is 127.0.0.1 (./dev up points it at its mailbox).
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_security: str = "none"
    # Seconds for the connection and each SMTP reply; a server slower than this is an attempt that failed.
    smtp_timeout_seconds: float = 10.0
    # E-mails one SMTP session carries before it is closed (each mail worker thread keeps its session
    # between e-mails, and doesn't reuse one idle over 30 s); 1 is a session per e-mail, for a relay that wants it.
    smtp_session_messages: int = 100
    mail_from: str = ""
    # Attempts of one e-mail after its first (across redeliveries: the outbox row counts them) before it
    # is left `failed` and logged; with the default backoff (full jitter, capped at RETRY_MAX_SECONDS)
    # that rides out about an hour of SMTP outage on average, two at most.
    mail_max_retries: int = 30

    # Verifying uploaded documents (POST /api/v1/verify): a size cap, a wall-clock limit for the
    # isolated child process that parses and validates, and how many run at once per web process.
    verify_max_bytes: int = 8 * 1024 * 1024
    verify_timeout_seconds: float = 5.0
    verify_concurrency: int = 2

    # The settings given (lower-case names: those the environment or the caller set, empty values
    # excepted), so production can tell a server it was told to use from the built-in default that points
    # at this machine (:func:`production_problems`). Not a setting itself: never read from the environment.
    given: frozenset = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        """Refuse settings that would break an invariant quietly, at start-up rather than under load."""
        # A comment or a stray space carried into a URL (systemd's EnvironmentFile keeps "# ..." after a
        # value) would otherwise end up in every QR code and link, or in the address we connect to.
        # DATABASE_URLs may be libpq "key=value key=value" strings, so only these are URLs proper.
        for name in ("redis_url", "broker_url", "document_store_url", "s3_endpoint_url", "public_base_url",
                     "gateway_url", "notification_url"):
            value = getattr(self, name)
            if any(ch.isspace() for ch in value) or "#" in value:
                raise ValueError(f"{name.upper()} must be one URL, without spaces or '#' (a comment on the "
                                 "same line as the setting is read as part of it): put comments on a line of their own")
        soft_limit = self.task_time_limit_seconds - 10
        if self.lease_seconds <= self.task_time_limit_seconds:
            raise ValueError("LEASE_SECONDS must exceed TASK_TIME_LIMIT_SECONDS: a running stamp must "
                             "always hold a live lease, or the sweep could refund it mid-stamp")
        if self.preflight_timeout_seconds >= soft_limit:
            raise ValueError("PREFLIGHT_TIMEOUT_SECONDS must stay under the task's soft time limit "
                             "(TASK_TIME_LIMIT_SECONDS - 10), so a hostile document gets an answer")
        if self.preflight_child_max_documents < 1 or self.preflight_child_max_growth_bytes < 1:
            raise ValueError("PREFLIGHT_CHILD_MAX_DOCUMENTS and PREFLIGHT_CHILD_MAX_GROWTH_BYTES must be "
                             "at least 1 (1 document per child is the old fork-per-document behaviour)")
        if not 0 <= self.status_cache_seconds <= 60:
            raise ValueError("STATUS_CACHE_SECONDS must be 0 to 60: it bounds how stale a buyer's status "
                             "can be when Redis misses a change")
        if not 0 < self.database_pool_timeout_seconds <= 30:
            raise ValueError("DATABASE_POOL_TIMEOUT_SECONDS must be above 0 and at most 30 (gunicorn's --timeout)")
        if not 2 <= self.database_connect_timeout_seconds <= 60:
            raise ValueError("DATABASE_CONNECT_TIMEOUT_SECONDS must be 2 to 60 (whole seconds: libpq takes 1 as 2)")
        if not 1 <= self.database_tcp_user_timeout_seconds <= 30:
            raise ValueError("DATABASE_TCP_USER_TIMEOUT_SECONDS must be 1 to 30 (gunicorn's --timeout): how long "
                             "a statement may wait on a database host that stopped answering before it fails")
        if not 0 < self.database_max_idle_seconds < self.database_max_lifetime_seconds:
            raise ValueError("DATABASE_MAX_IDLE_SECONDS must be above 0 and under "
                             "DATABASE_MAX_LIFETIME_SECONDS")
        if self.stamp_deadline_seconds <= self.lease_seconds:
            raise ValueError("STAMP_DEADLINE_SECONDS must exceed LEASE_SECONDS")
        if not 5 <= self.admission_max_retry_after_seconds <= 600:
            raise ValueError("ADMISSION_MAX_RETRY_AFTER_SECONDS must be between 5 and 600")
        if self.admission_abandon_seconds < max(90, 2 * self.admission_max_retry_after_seconds + 60):
            raise ValueError("ADMISSION_ABANDON_SECONDS must be at least 90 and at least twice "
                             "ADMISSION_MAX_RETRY_AFTER_SECONDS plus a minute, or buyers polling as told "
                             "could be taken for gone and skipped")
        for item in ("key", "cert", "ca_cert"):
            if getattr(self, f"signing_{item}_path") and getattr(self, f"signing_{item}_pem").strip():
                raise ValueError(f"SIGNING_{item.upper()}_PATH and SIGNING_{item.upper()}_PEM are both set: "
                                 "give each item of key material once, as a file or as PEM text")
        for name in ("rate_limit_create", "rate_limit_verify", "rate_limit_notifications"):
            # Checked here, or a typo ("20/minute") is a 500 on every request it guards.
            if not _RATE_LIMIT.fullmatch(getattr(self, name)) or int(getattr(self, name).partition("/")[0]) < 1:
                raise ValueError(f"{name.upper()} must be <count>/<seconds> (e.g. 20/60) with a count of at "
                                 f"least 1, not {getattr(self, name)!r}")
        self._check_redis()
        self._check_store()
        self._check_mail()
        if self.ops_token and len(self.ops_token) < MIN_SECRET_LENGTH:
            raise ValueError(f"OPS_TOKEN must be at least {MIN_SECRET_LENGTH} characters (or empty to turn "
                             "the ops endpoints off): a short token can be guessed")

    def _check_redis(self) -> None:
        from shared.redisconn import parse_redis_url  # ValueError names the setting and the problem

        parse_redis_url(self.redis_url, "REDIS_URL")
        if self.broker_url:
            parse_redis_url(self.broker_url, "BROKER_URL")

    def _check_mail(self) -> None:
        if self.smtp_security not in SMTP_SECURITY_MODES:
            raise ValueError(f"SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY_MODES)}, "
                             f"not {self.smtp_security!r}")
        if any(ch.isspace() for ch in self.smtp_host) or not 0 < self.smtp_port < 65536:
            raise ValueError("SMTP_HOST must be a host name or address and SMTP_PORT 1 to 65535")
        if bool(self.smtp_username) != bool(self.smtp_password):
            raise ValueError("SMTP_USERNAME and SMTP_PASSWORD go together: set both, or neither")
        if not 0 < self.smtp_timeout_seconds <= 120:
            raise ValueError("SMTP_TIMEOUT_SECONDS must be above 0 and at most 120")
        if not 1 <= self.smtp_session_messages <= 10_000:
            raise ValueError("SMTP_SESSION_MESSAGES must be 1 to 10000 (1: a session per e-mail)")
        if self.mail_max_retries < 0:
            raise ValueError("MAIL_MAX_RETRIES must be 0 or more")
        if self.mail_from:
            from email.utils import parseaddr

            _, address = parseaddr(self.mail_from)
            if "@" not in address or any(ch in self.mail_from for ch in "\r\n"):
                raise ValueError(f"MAIL_FROM={self.mail_from!r} must be an address, e.g. "
                                 "'meterai <noreply@example.id>'")

    @property
    def smtp_server_host(self) -> str:
        """SMTP_HOST, or (a development machine that didn't set it) this machine."""
        return self.smtp_host or "127.0.0.1"

    @property
    def mail_sender(self) -> str:
        """MAIL_FROM, or on a development machine the development sender."""
        return self.mail_from or DEV_MAIL_FROM

    @property
    def broker(self) -> str:
        """The Celery broker's URL: BROKER_URL, else REDIS_URL."""
        return self.broker_url or self.redis_url

    def _check_store(self) -> None:
        location = parse_document_store_url(self.document_store_url)  # ValueError names the problem
        if location.kind != "s3":
            return
        if self.s3_endpoint_url:
            endpoint = urlsplit(self.s3_endpoint_url)
            if endpoint.scheme not in ("http", "https") or not endpoint.hostname or endpoint.path not in (
                    "", "/") or endpoint.query or endpoint.username:
                raise ValueError(f"S3_ENDPOINT_URL={self.s3_endpoint_url!r} must be http(s)://host[:port], "
                                 "without a path or credentials")
        if self.s3_checksums not in S3_CHECKSUM_MODES:
            raise ValueError(f"S3_CHECKSUMS must be one of {', '.join(S3_CHECKSUM_MODES)}, "
                             f"not {self.s3_checksums!r}")
        if not (0 < self.s3_connect_timeout <= 60 and 0 < self.s3_read_timeout <= 300):
            raise ValueError("S3_CONNECT_TIMEOUT must be over 0 and at most 60 seconds, S3_READ_TIMEOUT over 0 "
                             "and at most 300: a store that is down must turn into a quick 'come back'")
        if not 1 <= self.s3_max_attempts <= 10:
            raise ValueError("S3_MAX_ATTEMPTS must be 1 to 10 (attempts per call, the first included)")
        if self.s3_conditional_writes not in (0, 1):
            raise ValueError("S3_CONDITIONAL_WRITES must be 0 or 1")
        if self.s3_addressing_style not in ("", "auto", "path", "virtual"):
            raise ValueError("S3_ADDRESSING_STYLE must be path, virtual or auto (or empty)")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError("S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY go together: set both, or neither "
                             "(boto3's own credential chain)")

    @property
    def document_store(self) -> "StoreLocation":
        """Where documents live, from DOCUMENT_STORE_URL (and DOCUMENT_DIR / DATA_DIR for the default)."""
        location = parse_document_store_url(self.document_store_url)
        if location.kind == "file" and not location.path:
            return StoreLocation("file", path=str(self.documents_path))
        return location

    @property
    def price(self) -> int:
        return self.stamp_face_value + self.service_fee

    @property
    def documents_path(self) -> Path:
        """The filesystem store's folder (file:// URL, else DOCUMENT_DIR, else <data_dir>/documents)."""
        location = parse_document_store_url(self.document_store_url)
        if location.kind == "file" and location.path:
            return Path(location.path)
        return Path(self.document_dir or os.path.join(self.data_dir, "documents"))

    @property
    def broker_visibility_timeout(self) -> int:
        """Longer than the longest task plus the longest retry delay, so a slow task is never redelivered
        to a second worker while the first still runs it."""
        return int(self.task_time_limit_seconds + self.retry_max_seconds + 3600)


S3_CHECKSUM_MODES = ("when_required", "when_supported")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed DOCUMENT_STORE_URL: ``kind`` "file" (``path``; empty: the default folder) or "s3"
    (``bucket``, and ``prefix``: empty or ending in "/")."""

    kind: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""


def parse_document_store_url(url: str) -> StoreLocation:
    """DOCUMENT_STORE_URL as a :class:`StoreLocation`; ValueError says what is wrong with it."""
    url = url.strip()
    if not url:
        return StoreLocation("file")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query:
            raise ValueError(f"DOCUMENT_STORE_URL={url!r}: a filesystem store is file:///absolute/path")
        return StoreLocation("file", path=parts.path)
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"DOCUMENT_STORE_URL={url!r}: {bucket!r} is not an S3 bucket name (3 to 63 "
                             "lower-case letters, digits, dots and hyphens)")
        if parts.query or parts.fragment or (prefix and (not _PREFIX.fullmatch(prefix) or any(
                segment in (".", "..") for segment in prefix.split("/")))):
            raise ValueError(f"DOCUMENT_STORE_URL={url!r}: the prefix must be plain path segments "
                             "(letters, digits, -_.!*'()), no '.' or '..', no query")
        return StoreLocation("s3", bucket=bucket, prefix=f"{prefix}/" if prefix else "")
    raise ValueError(f"DOCUMENT_STORE_URL={url!r} must be empty, file:///absolute/path or s3://bucket/prefix")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def production_problems(settings: Settings) -> list[str]:
    """Every development default ``settings`` still uses; empty when it may serve real buyers.

    Checked whatever ``DEVELOPMENT`` says (the caller decides whether a problem is fatal), so a
    development machine can still print what production would refuse.
    """
    problems = []
    # The defaults are this machine's servers: a node started without its settings would take orders into
    # a database and a Redis of its own, which the other nodes (workers, beat, the other web nodes) never
    # see. Named even when they are this machine's, so that is a decision, not an accident.
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, what in (("database_url", "PostgreSQL"), ("redis_url", "Redis")):
        if name not in settings.given and getattr(settings, name) == defaults[name]:
            problems.append(f"{name.upper()} is not set: the built-in default is a {what} on this machine "
                            f"({defaults[name]}); name the one every node shares, even if it is that one")
    if settings.secret_key == DEV_SECRET_KEY or len(settings.secret_key) < MIN_SECRET_LENGTH:
        problems.append(f"SECRET_KEY is the development key or shorter than {MIN_SECRET_LENGTH} characters")
    if settings.signing_dev_pki:
        problems.append("SIGNING_DEV_PKI=1 asks for a development CA to sign stamps: set "
                        "SIGNING_DEV_PKI=0 and the SIGNING_*_PATH files of the real issuer")
    from shared.stamping.key_material import pki_paths  # it imports this module

    paths = pki_paths(settings)
    if any(_made_by_development_pki(item) for item in (paths.cert, paths.ca_cert)):
        problems.append("the signing certificates are the development PKI's: configure the real issuer's "
                        "SIGNING_KEY_PATH, SIGNING_CERT_PATH and SIGNING_CA_CERT_PATH")
    if settings.gateway_server_key == DEV_GATEWAY_SERVER_KEY or settings.gateway_server_key.startswith(
            SANDBOX_KEY_PREFIX):
        problems.append("GATEWAY_SERVER_KEY is a sandbox key (no real money moves): set the production key")
    if not settings.gateway_url.startswith("https://"):
        problems.append("GATEWAY_URL is not https (the default is the stand-in gateway on this machine)")
    if not settings.public_base_url.startswith("https://"):
        problems.append("PUBLIC_BASE_URL is not https (every stamp's QR code points there)")
    if settings.document_store.kind == "s3" and settings.s3_endpoint_url:
        endpoint = urlsplit(settings.s3_endpoint_url)
        if endpoint.scheme != "https" and not _loopback(endpoint.hostname or ""):
            problems.append("S3_ENDPOINT_URL is plain http to another machine: buyers' documents would cross "
                            "the network readable; use https (plain http only to a loopback address)")
    if not settings.mail_from:
        problems.append("MAIL_FROM is not set: buyers' e-mails need a sender of yours (e.g. "
                        "'meterai <noreply@example.id>')")
    if not settings.smtp_host:
        problems.append("SMTP_HOST is not set: buyers' e-mails (receipts with their order links) would go to "
                        "a relay on this machine's port 25 that may not exist, failing unseen; name the SMTP "
                        "server (SMTP_HOST, SMTP_PORT, SMTP_SECURITY), SMTP_HOST=127.0.0.1 for a local relay")
    elif settings.smtp_security == "none" and not _loopback(settings.smtp_host):
        problems.append("SMTP_SECURITY=none to another machine (SMTP_HOST): e-mails carry access links"
                        + (" and SMTP_PASSWORD would" if settings.smtp_password else "")
                        + " cross the network readable; use starttls or tls (plain SMTP only to a relay on "
                        "this machine)")
    return problems


def _made_by_development_pki(source) -> bool:
    """Whether the PEM certificate at ``source`` (a file or PEM text, if there is one) is, or was issued
    by, the development PKI: the issuer certificate is what signs, so a real root beside a development
    issuer is no better."""
    try:
        data = source.read_bytes()
    except OSError:
        return False
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        return False
    return any(attribute.value == DEV_PKI_ORGANIZATION
               for name in (certificate.subject, certificate.issuer)
               for attribute in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))


def refuse_unsafe(settings: Settings, role: str) -> None:
    """Called where web and worker processes start: outside development, any development default is fatal."""
    if settings.development:
        return
    problems = production_problems(settings)
    if problems:
        raise UnsafeSettings(
            f"meterai {role} refuses to start on development defaults:\n  - " + "\n  - ".join(problems)
            + "\nSet them for production, or DEVELOPMENT=1 on a development machine.")


def _coerce(raw: str, kind: type) -> object:
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``env`` (default: the process environment), upper-case names (``DATABASE_URL``)."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Settings):
        if f.name == "given":
            continue
        raw = env.get(f.name.upper())
        raw = raw.strip() if raw is not None else None
        if raw:  # empty or blank: the default
            kind = type(f.default) if f.default is not None else str
            try:
                values[f.name] = _coerce(raw, kind)
            except ValueError:
                what = "a whole number (0 or 1 for a switch)" if kind is int else "a number"
                raise ValueError(f"{f.name.upper()}={raw!r} must be {what}") from None
    values.update(overrides)
    values.setdefault("given", frozenset(name for name in values if name != "given"))
    return Settings(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
