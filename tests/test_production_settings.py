"""Production can't start on a development default by accident (issue 9, point 8 and 9)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import UnsafeSettings, load_settings, production_problems, refuse_unsafe

ROOT = Path(__file__).resolve().parents[1]

PRODUCTION = {
    "DATABASE_URL": "postgresql://meterai@db.internal:5432/meterai",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "SECRET_KEY": "k" * 40,
    "SIGNING_DEV_PKI": "0",
    "GATEWAY_SERVER_KEY": "Mid-server-real-production-key",
    "GATEWAY_URL": "https://api.midtrans.com",
    "PUBLIC_BASE_URL": "https://meterai.example.id",
    "MAIL_FROM": "meterai <noreply@meterai.example.id>",
    "SMTP_HOST": "127.0.0.1",  # a relay on this machine, named
}


def test_complete_production_settings_start():
    settings = load_settings(PRODUCTION)
    assert production_problems(settings) == []
    refuse_unsafe(settings, "web")


@pytest.mark.parametrize("name, value, words", [
    ("SECRET_KEY", "", "SECRET_KEY"),
    ("SECRET_KEY", "short-but-not-default", "SECRET_KEY"),
    ("SIGNING_DEV_PKI", "1", "SIGNING_DEV_PKI"),
    ("GATEWAY_SERVER_KEY", "SB-Mid-server-meterai-dev", "sandbox key"),
    ("GATEWAY_SERVER_KEY", "SB-Mid-server-someone-elses-sandbox", "sandbox key"),
    ("GATEWAY_URL", "http://127.0.0.1:8001", "GATEWAY_URL"),
    ("PUBLIC_BASE_URL", "http://127.0.0.1:8000", "PUBLIC_BASE_URL"),
    ("MAIL_FROM", "", "MAIL_FROM"),
    ("SMTP_HOST", "smtp.example.id", "SMTP_SECURITY=none to another machine"),
    ("SMTP_HOST", "", "SMTP_HOST is not set"),
    ("DATABASE_URL", "", "DATABASE_URL is not set"),
    ("REDIS_URL", "", "REDIS_URL is not set"),
])
def test_each_development_default_is_refused_outside_development(name, value, words):
    env = {**PRODUCTION, name: value}
    if value == "":
        del env[name]  # the built-in default
    with pytest.raises(UnsafeSettings, match=words):
        refuse_unsafe(load_settings(env), "web")
    refuse_unsafe(load_settings({**env, "DEVELOPMENT": "1"}), "web")  # knowingly: allowed


def test_a_short_ops_token_is_refused_even_in_development():
    with pytest.raises(ValueError, match="OPS_TOKEN"):
        load_settings({"DEVELOPMENT": "1", "OPS_TOKEN": "hunter2"})
    assert load_settings({"OPS_TOKEN": "o" * 32}).ops_token


def test_web_refuses_to_start_on_the_built_in_defaults():
    """What gunicorn (and ``celery -A workers.make_celery``, which builds the same app) would do with
    nothing configured: exit with the list of what to set, not serve."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEVELOPMENT", "SECRET_KEY")}
    result = subprocess.run([sys.executable, "-c", "import web; web.create_app()"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refuses to start on development defaults" in result.stderr
    for name in ("SECRET_KEY", "SIGNING_DEV_PKI", "GATEWAY_SERVER_KEY", "GATEWAY_URL"):
        assert name in result.stderr


def test_a_production_node_without_its_key_material_refuses_to_start(tmp_path):
    """Key material is loaded on every node from configuration, never made: a node missing the root it
    checks stamps against stops at start-up with the names of what to set; nothing is generated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNING_", "DEVELOPMENT"))}
    env.update(PRODUCTION, DATA_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", "import web; web.create_app()"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "can't start without its signing key material" in result.stderr
    assert "SIGNING_CA_CERT_PATH" in result.stderr
    assert not any(tmp_path.rglob("*")), "nothing is generated"


def test_only_stamping_workers_need_the_issuers_key(tmp_path):
    """A web node (and a worker of any other queue) starts with the root certificate alone: the issuer's
    private key need not sit on an internet-facing machine. A stamping worker without it exits at once,
    naming what to set, instead of retrying every stamp."""
    root = tmp_path / "root.pem"
    _real_root(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNING_", "DEVELOPMENT"))}
    env.update(PRODUCTION, DATA_DIR=str(tmp_path / "data"), SIGNING_CA_CERT_PATH=str(root))
    web = subprocess.run([sys.executable, "-c", "import web; web.create_app()"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert web.returncode == 0, web.stderr

    # The broker is never reached: the check runs as the worker is set up, before it connects.
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    stamping = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.make_celery", "worker",
                               "--queues", "stamping", "--pool", "solo", "--loglevel", "WARNING"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert stamping.returncode != 0
    assert "stamping worker can't start without its signing key material" in stamping.stderr
    assert "SIGNING_KEY_PATH" in stamping.stderr and "SIGNING_CERT_PATH" in stamping.stderr


def test_a_copied_development_ca_is_refused_outside_development(tmp_path):
    """SIGNING_DEV_PKI=0 with the development CA's files copied to the configured paths is still the
    development CA."""
    from shared.devtools.pki import ensure_pki
    from shared.stamping.key_material import pki_paths

    dev = load_settings({"DEVELOPMENT": "1"}, data_dir=str(tmp_path / "dev"))
    paths = pki_paths(dev)
    ensure_pki(paths)
    env = {**PRODUCTION, "SIGNING_KEY_PATH": str(paths.key), "SIGNING_CERT_PATH": str(paths.cert),
           "SIGNING_CA_CERT_PATH": str(paths.ca_cert)}
    with pytest.raises(UnsafeSettings, match="development PKI"):
        refuse_unsafe(load_settings(env), "worker")
    # A real root beside the development issuer (which is what signs) is refused too.
    real_root = tmp_path / "real-root.pem"
    _real_root(real_root)
    with pytest.raises(UnsafeSettings, match="development PKI"):
        refuse_unsafe(load_settings({**env, "SIGNING_CA_CERT_PATH": str(real_root)}), "worker")


def _real_root(path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Perum Peruri"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Root")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_a_setting_of_the_wrong_kind_is_named():
    with pytest.raises(ValueError, match="DEVELOPMENT='true' must be a whole number"):
        load_settings({"DEVELOPMENT": "true"})


def test_the_cli_refuses_to_move_money_on_development_defaults_but_still_reads():
    env = {k: v for k, v in os.environ.items() if k not in ("DEVELOPMENT", "SECRET_KEY")}
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/nowhere"  # never reached
    refused = subprocess.run([sys.executable, "-m", "shared.cli", "sweep-refunds"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refuses to start on development defaults" in refused.stderr
    reading = subprocess.run([sys.executable, "-m", "shared.cli", "ledger-report"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert "refuses to start" not in reading.stderr  # it fails for the database, not for the settings


@pytest.mark.parametrize("name", ["PUBLIC_BASE_URL", "REDIS_URL", "GATEWAY_URL"])
def test_a_comment_carried_into_a_url_is_refused(name):
    """systemd's EnvironmentFile keeps an inline "# ..." as part of the value."""
    value = {**PRODUCTION, "REDIS_URL": "redis://10.0.0.5:6379/0"}.get(name)
    with pytest.raises(ValueError, match=f"{name} must be one URL"):
        load_settings({**PRODUCTION, name: f"{value}  # every stamp's QR code points here"})


def test_plain_smtp_is_refused_to_another_machine_and_never_shows_the_password():
    """E-mails carry access links: plain SMTP only to a relay on this machine, TLS to any other."""
    def problems(**env: str) -> list[str]:
        return [p for p in production_problems(load_settings({**PRODUCTION, **env})) if "SMTP" in p]

    remote = {"SMTP_HOST": "smtp.example.id", "SMTP_USERNAME": "meterai", "SMTP_PASSWORD": "s3cret-pass"}
    [problem] = problems(**remote)
    assert "SMTP_PASSWORD" in problem and "s3cret-pass" not in problem
    assert problems(**remote, SMTP_SECURITY="starttls") == problems(**remote, SMTP_SECURITY="tls") == []
    assert problems(SMTP_HOST="127.0.0.1") == problems(SMTP_HOST="localhost") == []


def test_production_names_its_smtp_server_and_development_falls_back_to_this_machine():
    """The built-in default used to be 127.0.0.1:25 without TLS, accepted in production: a node without a
    relay there failed every e-mail unseen. Now production must say where mail goes."""
    unset = {k: v for k, v in PRODUCTION.items() if k != "SMTP_HOST"}
    [problem] = [p for p in production_problems(load_settings(unset)) if "SMTP" in p]
    assert "SMTP_HOST is not set" in problem
    with pytest.raises(UnsafeSettings, match="SMTP_HOST is not set"):
        refuse_unsafe(load_settings(unset), "worker")
    development = load_settings({"DEVELOPMENT": "1"})
    assert development.smtp_host == "" and development.smtp_server_host == "127.0.0.1"
    assert load_settings({**unset, "SMTP_HOST": "smtp.example.id"}).smtp_server_host == "smtp.example.id"


@pytest.mark.parametrize("env, words", [
    ({"SMTP_SECURITY": "ssl"}, "SMTP_SECURITY"),
    ({"SMTP_HOST": "smtp example.id"}, "SMTP_HOST"),
    ({"SMTP_USERNAME": "meterai"}, "SMTP_USERNAME and SMTP_PASSWORD"),
    ({"SMTP_PORT": "0"}, "SMTP_PORT"),
    ({"MAIL_FROM": "not an address"}, "MAIL_FROM"),
])
def test_mail_settings_that_cannot_work_are_refused_in_any_mode(env, words):
    with pytest.raises(ValueError, match=words):
        load_settings({"DEVELOPMENT": "1", **env})


def test_this_machines_servers_named_on_purpose_are_accepted():
    """The built-in defaults are refused because nobody chose them; the same addresses, set, are a choice."""
    env = {**PRODUCTION, "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/meterai",
           "REDIS_URL": "redis://127.0.0.1:6379/0"}
    assert production_problems(load_settings(env)) == []
    assert production_problems(load_settings({**env, "REDIS_URL": ""})) == [
        "REDIS_URL is not set: the built-in default is a Redis on this machine (redis://127.0.0.1:6379/0); name the "
        "one every node shares, even if it is that one"]


def test_a_blank_database_url_is_the_default_and_refused_a_server_set_in_code_is_not():
    """A blank value is no setting (libpq would read it as this machine's socket); settings made in code
    (dataclasses.replace) with a server of their own are not taken for the default."""
    import dataclasses

    assert any("DATABASE_URL is not set" in p for p in production_problems(load_settings({**PRODUCTION, "DATABASE_URL": "   "})))
    made = dataclasses.replace(load_settings({k: v for k, v in PRODUCTION.items() if k != "DATABASE_URL"}),
                               database_url="postgresql://meterai@db.internal/meterai")
    assert not [p for p in production_problems(made) if "DATABASE_URL" in p]
