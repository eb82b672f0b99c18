"""The mail worker keeps one SMTP session per thread between e-mails (``shared/services/mail.py``:
SMTP_SESSION_MESSAGES, SESSION_IDLE_SECONDS), against a real aiosmtpd mailbox: in the clear and over
STARTTLS with the server's certificate verified. What must hold: each e-mail arrives once, a session the
server ended (or answered 421) is replaced before anything of the e-mail was sent on it, and a session is
reused only after a message it carried was taken."""
from __future__ import annotations

import dataclasses
import ssl
import threading

import pytest

from shared.config import load_settings
from shared.devtools.services import free_port
from shared.devtools.smtp import Mailbox
from shared.devtools.tlscert import make_server_cert
from shared.lifecycle import Mail
from shared.services import mail

FACTS = mail.Facts(order_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427", email="pelamar@example.id", amount=10900,
                   link="https://meterai.example.id/pesanan/1b4e28ba#t=abc")


def _drop_kept_session() -> None:
    if mail._kept.smtp is not None:
        mail._end(mail._kept.smtp)
        mail._kept.smtp = None


@pytest.fixture(autouse=True)
def fresh_session():
    """Each test starts with no session kept on this thread (and leaves none behind)."""
    _drop_kept_session()
    yield
    _drop_kept_session()


@pytest.fixture
def box():
    mailbox = Mailbox(free_port()).start()
    yield mailbox
    mailbox.stop()


def _settings(port: int, security: str = "none"):
    return dataclasses.replace(load_settings({"DEVELOPMENT": "1"}), smtp_host="127.0.0.1", smtp_port=port,
                               smtp_security=security)


def _message(to: str = "pelamar@example.id") -> mail.Outgoing:
    return mail.compose(_settings(25), Mail.RECEIPT, dataclasses.replace(FACTS, email=to))


def _sessions(peers: list[tuple[str, int]]) -> list[int]:
    """Each message's session, numbered in order of first use: [0, 0, 1] is two on one session, then one."""
    numbers: dict[tuple[str, int], int] = {}
    return [numbers.setdefault(peer, len(numbers)) for peer in peers]


def test_one_session_carries_a_threads_emails_one_after_another(box):
    settings = _settings(box.port)
    for _ in range(3):
        mail.deliver(settings, _message())
    assert len(box.messages()) == 3
    assert _sessions(box.peers()) == [0, 0, 0]


def test_each_thread_has_a_session_of_its_own(box):
    settings = _settings(box.port)
    errors: list[BaseException] = []
    both_sent_once = threading.Barrier(2, timeout=30)  # both sessions are alive at once

    def send_two() -> None:
        try:
            mail.deliver(settings, _message())
            both_sent_once.wait()
            mail.deliver(settings, _message())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            _drop_kept_session()

    threads = [threading.Thread(target=send_two) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    peers = box.peers()
    assert len(peers) == 4 and len(set(peers)) == 2 and all(peers.count(peer) == 2 for peer in peers)


def test_a_session_the_server_ended_is_replaced_and_the_email_arrives_once(box):
    settings = _settings(box.port)
    mail.deliver(settings, _message())
    box.stop()  # the server goes away (a restart, an idle timeout): our kept session is dead
    box.start()
    mail.deliver(settings, _message("kedua@example.id"))
    assert [m["To"] for m in box.messages()] == ["pelamar@example.id", "kedua@example.id"]
    assert _sessions(box.peers()) == [0, 1]


def test_a_421_to_mail_on_a_kept_session_starts_a_new_one(box):
    settings = _settings(box.port)
    mail.deliver(settings, _message())
    closing = box.fault("mail", reply="421 4.4.2 mailbox.test closing idle connection")
    mail.deliver(settings, _message("kedua@example.id"))
    assert closing.hits == 1
    assert [m["To"] for m in box.messages()] == ["pelamar@example.id", "kedua@example.id"]
    assert _sessions(box.peers()) == [0, 1]


def test_a_421_on_a_new_session_is_a_failed_attempt_not_a_loop(box):
    settings = _settings(box.port)
    closing = box.fault("mail", reply="421 4.3.2 service shutting down", times=5)
    with pytest.raises(mail.SmtpFailure, match="421") as failed:
        mail.deliver(settings, _message())
    assert closing.hits == 1 and not failed.value.in_doubt and not failed.value.permanent
    assert box.messages() == [] and mail._kept.smtp is None


def test_a_session_idle_too_long_is_ended_not_reused(box, monkeypatch):
    monkeypatch.setattr(mail, "SESSION_IDLE_SECONDS", 0.0)
    settings = _settings(box.port)
    mail.deliver(settings, _message())
    mail.deliver(settings, _message())
    assert _sessions(box.peers()) == [0, 1]


def test_a_session_ends_after_its_share_of_messages(box):
    settings = dataclasses.replace(_settings(box.port), smtp_session_messages=2)
    for _ in range(5):
        mail.deliver(settings, _message())
    assert _sessions(box.peers()) == [0, 0, 1, 1, 2]
    one_each = dataclasses.replace(settings, smtp_session_messages=1)  # the relay wants a session per e-mail
    box.clear()
    for _ in range(2):
        mail.deliver(one_each, _message())
    assert _sessions(box.peers()) == [0, 1] and mail._kept.smtp is None


def test_the_share_of_messages_is_checked_as_settings_load():
    assert load_settings({"DEVELOPMENT": "1", "SMTP_SESSION_MESSAGES": "1"}).smtp_session_messages == 1
    for wrong in ("0", "10001"):
        with pytest.raises(ValueError, match="SMTP_SESSION_MESSAGES"):
            load_settings({"DEVELOPMENT": "1", "SMTP_SESSION_MESSAGES": wrong})


def test_other_settings_get_another_session(box):
    mail.deliver(_settings(box.port), _message())
    mail.deliver(dataclasses.replace(_settings(box.port), smtp_timeout_seconds=3.0), _message())
    assert _sessions(box.peers()) == [0, 1]


def test_after_a_refusal_the_next_email_starts_a_new_session(box):
    settings = _settings(box.port)
    mail.deliver(settings, _message())
    box.fault("rcpt", to="ditolak@example.id", reply="554 5.7.1 relaying denied")
    with pytest.raises(mail.SmtpFailure, match="554"):
        mail.deliver(settings, _message("ditolak@example.id"))
    assert mail._kept.smtp is None  # a session left mid-transaction is never kept
    mail.deliver(settings, _message())
    assert _sessions(box.peers()) == [0, 1]


@pytest.fixture
def tls_box(tmp_path, monkeypatch):
    """A mailbox that offers STARTTLS and requires it, its certificate from a CA made for the test, which
    the client trusts (SSL_CERT_FILE, as an operator's CA bundle would be)."""
    cert = make_server_cert(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert.ca))
    mail._tls_context.cache_clear()
    mailbox = Mailbox(free_port(), tls_context=context).start()
    yield mailbox
    mailbox.stop()
    _drop_kept_session()
    monkeypatch.undo()
    mail._tls_context.cache_clear()


def test_starttls_with_the_certificate_verified_and_the_session_kept(tls_box):
    settings = _settings(tls_box.port, "starttls")
    for _ in range(2):
        mail.deliver(settings, _message())
    assert len(tls_box.messages()) == 2 and _sessions(tls_box.peers()) == [0, 0]
    assert mail.probe(settings) is None


def test_a_server_certificate_from_an_unknown_ca_is_refused(tls_box, tmp_path, monkeypatch):
    stranger = make_server_cert(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger.ca))
    mail._tls_context.cache_clear()
    with pytest.raises(mail.SmtpFailure, match="CERTIFICATE_VERIFY_FAILED") as failed:
        mail.deliver(_settings(tls_box.port, "starttls"), _message())
    assert not failed.value.in_doubt and tls_box.messages() == []


def test_a_server_requiring_starttls_refuses_a_client_in_the_clear(tls_box):
    with pytest.raises(mail.SmtpFailure, match="530"):
        mail.deliver(_settings(tls_box.port, "none"), _message())
    assert tls_box.messages() == []


@pytest.mark.parametrize("reply", ["451 4.7.1 greylisted, try again later", "554 5.7.1 message refused as spam",
                                   "552 5.3.4 message too big"])
def test_a_refusal_at_the_end_of_data_is_a_failed_attempt_not_a_delivery(box, reply):
    """smtplib returns (does not raise) the answer to DATA's final dot: a refusal there is no delivery."""
    settings = _settings(box.port)
    mail.deliver(settings, _message())  # a session is kept
    refused = box.fault("data", reply=reply)
    with pytest.raises(mail.SmtpFailure, match=reply.split()[0]) as failed:
        mail.deliver(settings, _message("kedua@example.id"))
    assert refused.hits == 1 and not failed.value.in_doubt and not failed.value.permanent
    assert [m["To"] for m in box.messages()] == ["pelamar@example.id"] and mail._kept.smtp is None
    mail.deliver(settings, _message("kedua@example.id"))  # the retry: on a new session
    assert [m["To"] for m in box.messages()] == ["pelamar@example.id", "kedua@example.id"]
    assert _sessions(box.peers()) == [0, 1]


def test_a_session_interrupted_mid_data_is_closed_not_kept_nor_quit(box, monkeypatch):
    """A soft time limit (or any exception) during DATA leaves the session in an unknown state: closed
    without a QUIT that could wait out a timeout, never kept."""
    settings = _settings(box.port)
    mail.deliver(settings, _message())
    kept = mail._kept.smtp
    quits: list[object] = []
    monkeypatch.setattr(type(kept), "quit", lambda self: quits.append(self))

    def interrupted(self, content):  # noqa: ANN001
        raise KeyboardInterrupt("a soft time limit, as the watchdog raises it")

    monkeypatch.setattr(type(kept), "data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mail.deliver(settings, _message("kedua@example.id"))
    assert quits == [] and mail._kept.smtp is None and kept.sock is None


@pytest.mark.parametrize("timeout, limit", [(10.0, 120), (30.0, 120), (5.0, 600)])
def test_the_sending_lease_outlasts_any_attempt(timeout, limit):
    """A second worker claims a 'sending' row only when its lease ran out, and then sends the e-mail again:
    the lease must outlast the hard time limit that ends an attempt (the old 8 timeouts + 30 s was 110 s
    against the default 120 s limit, and didn't count the kept session's unanswered MAIL)."""
    settings = load_settings({"SMTP_TIMEOUT_SECONDS": str(timeout), "TASK_TIME_LIMIT_SECONDS": str(limit),
                              "LEASE_SECONDS": str(limit + 60)})
    # The hard limit ends an attempt (the watchdog ends its process within a few seconds of it): by then
    # it has waited out at most limit // timeout timeouts, whatever the steps.
    assert mail.lease_seconds(settings) >= limit + 20
