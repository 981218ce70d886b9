"""Login when shared (mammo_core.auth and the app's sign-in): local mode only on loopback, network
mode refused without a login, password users from a bcrypt file outside the repository, OIDC roles,
and what each role can reach (AppTest through the real login form)."""

from __future__ import annotations

import subprocess
import sys

import bcrypt
import pytest
from streamlit.testing.v1 import AppTest

from mammo_core import auth
from mammo_core.config import REPO_ROOT
from mammo_core.store.audit import AuditLog, sha256_hex

APP = str(REPO_ROOT / "app.py")
TIMEOUT = 90


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()  # cheap rounds: tests only


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "etc" / "users.toml"
    path.parent.mkdir()
    path.write_text(f'''
[users.ada]
role = "admin"
password_hash = "{_hash('admin-pass')}"

[users.rita]
role = "reader"
password_hash = "{_hash('reader-pass')}"
''')
    path.chmod(0o600)
    return path


@pytest.fixture
def app_with_login(monkeypatch, tmp_path, tiny_weights, tiny_dataset, users_file):
    monkeypatch.setenv(auth.AUTH_FILE_ENV, str(users_file))
    monkeypatch.delenv(auth.NETWORK_ENV, raising=False)
    monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(tiny_weights))
    monkeypatch.setenv("MAMMO_DATA_DIR", str(tiny_dataset))
    monkeypatch.setenv("MAMMO_AUDIT_DB", str(tmp_path / "audit" / "audit.sqlite3"))
    _set_address("0.0.0.0")
    auth.THROTTLE._failures.clear()
    return tmp_path / "audit" / "audit.sqlite3"


def _set_address(address: str) -> None:
    """Streamlit's server.address for this test (as `--server.address` would set it), restored after."""
    from streamlit import config as st_config

    _RESTORE.append(st_config.get_option("server.address"))
    st_config.set_option("server.address", address)


_RESTORE: list = []


@pytest.fixture(autouse=True)
def _restore_address():
    yield
    from streamlit import config as st_config

    while _RESTORE:
        st_config.set_option("server.address", _RESTORE.pop())


def _login(name: str, password: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert at.title[0].value == "Sign in" and not at.sidebar.selectbox  # nothing else before signing in
    at.text_input(key="login_user").input(name)
    at.text_input(key="login_password").input(password)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# --- mammo_core.auth -------------------------------------------------------------------------------


@pytest.mark.parametrize("address,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                              ("127.0.0.2", True), ("0.0.0.0", False), ("", False), (None, False),
                                              ("192.168.1.10", False), ("::", False)])
def test_loopback_addresses(address, loopback):
    assert auth.is_loopback(address) is loopback


def test_serving_to_the_network_needs_a_login(monkeypatch, users_file):
    monkeypatch.delenv(auth.AUTH_FILE_ENV, raising=False)
    monkeypatch.delenv(auth.NETWORK_ENV, raising=False)
    assert auth.serve_check("127.0.0.1", secrets={}) == "local"
    with pytest.raises(auth.AuthConfigError, match="refusing to serve to the network"):
        auth.serve_check("0.0.0.0", secrets={})
    monkeypatch.setenv(auth.NETWORK_ENV, "1")  # shared behind a proxy on loopback
    with pytest.raises(auth.AuthConfigError, match="refusing"):
        auth.serve_check("127.0.0.1", secrets={})
    monkeypatch.setenv(auth.AUTH_FILE_ENV, str(users_file))
    assert auth.serve_check("0.0.0.0", secrets={}) == "password"


def test_make_serve_check_refuses_without_login(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MAMMO_NETWORK": "1"}
    proc = subprocess.run([sys.executable, "-m", "mammo_core.auth", "check-serve", "0.0.0.0"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "refusing to serve to the network" in proc.stderr
    makefile = (REPO_ROOT / "Makefile").read_text()
    serve = makefile.split("\nserve:", 1)[1].split("\n\n", 1)[0]
    assert serve.index("check-serve") < serve.index("streamlit run")  # `make serve` checks before it listens
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "--server.address 127.0.0.1" in run


def test_users_file_rules(tmp_path, users_file):
    users = auth.load_users(users_file)
    assert users["ada"]["role"] == "admin" and users["rita"]["role"] == "reader"
    inside = REPO_ROOT / "tests" / ".users-test.toml"
    inside.write_text(users_file.read_text())
    try:
        with pytest.raises(auth.AuthConfigError, match="outside the repository"):
            auth.load_users(inside)
    finally:
        inside.unlink()
    users_file.chmod(0o666)
    with pytest.raises(auth.AuthConfigError, match="writable by other users"):
        auth.load_users(users_file)
    users_file.chmod(0o600)
    bad = tmp_path / "bad.toml"
    bad.write_text('[users.x]\nrole = "root"\npassword_hash = "$2b$04$abc"\n')
    with pytest.raises(auth.AuthConfigError, match="role 'root'"):
        auth.load_users(bad)
    bad.write_text('[users.x]\nrole = "reader"\npassword_hash = "plaintext"\n')
    with pytest.raises(auth.AuthConfigError, match="bcrypt"):
        auth.load_users(bad)
    with pytest.raises(auth.AuthConfigError, match="not found"):
        auth.load_users(tmp_path / "missing.toml")


def test_password_check_and_lockout(users_file):
    users = auth.load_users(users_file)
    throttle = auth.LoginThrottle(max_failures=3, lockout_s=60)
    assert auth.check_password(users, "rita", "reader-pass", throttle) == auth.User("rita", "reader", "password")
    assert auth.check_password(users, "rita", "wrong", throttle) is None
    assert auth.check_password(users, "nobody", "reader-pass", throttle) is None
    for _ in range(3):
        auth.check_password(users, "ada", "guess", throttle)
    assert auth.check_password(users, "ada", "admin-pass", throttle) is None  # locked out
    assert auth.check_password(users, "rita", "reader-pass", throttle) is not None  # other names unaffected
    assert auth.hash_password("s3cret").startswith("$2b$12$")


def test_oidc_configuration_and_roles():
    secrets = {"auth": {"redirect_uri": "https://mammo.example.org/oauth2callback", "cookie_secret": "x" * 32,
                        "client_id": "id", "client_secret": "s",
                        "server_metadata_url": "https://idp.example.org/.well-known/openid-configuration"},
               "mammo_roles": {"admins": ["ada@example.org"], "readers": ["*@example.org"]}}
    assert auth.oidc_configured(secrets) and auth.login_method(secrets) == "oidc"
    assert not auth.oidc_configured({"auth": secrets["auth"]})  # no role table: nobody would be let in safely
    assert auth.oidc_role("Ada@Example.org", secrets["mammo_roles"]) == "admin"
    assert auth.oidc_role("rita@example.org", secrets["mammo_roles"]) == "reader"
    assert auth.oidc_role("eve@elsewhere.com", secrets["mammo_roles"]) is None
    assert auth.oidc_role(None, secrets["mammo_roles"]) is None


# --- the app ------------------------------------------------------------------------------------------


def test_app_on_a_network_address_without_login_refuses(monkeypatch, tiny_weights):
    monkeypatch.delenv(auth.AUTH_FILE_ENV, raising=False)
    monkeypatch.delenv(auth.NETWORK_ENV, raising=False)
    monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(tiny_weights))
    _set_address("0.0.0.0")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert any("no login is configured, so it refuses to run" in e.value for e in at.error)
    assert not at.sidebar.selectbox and not at.get("page_link")


def test_app_with_oidc_configured_shows_only_the_sign_in(monkeypatch, tiny_weights):
    monkeypatch.delenv(auth.AUTH_FILE_ENV, raising=False)
    monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(tiny_weights))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
                          "client_id": "id", "client_secret": "s",
                          "server_metadata_url": "https://idp.example.org/.well-known/openid-configuration"}
    at.secrets["mammo_roles"] = {"readers": ["*@example.org"]}
    at.run()
    assert at.title[0].value == "Sign in"
    assert [b.label for b in at.button] == ["Sign in with your organisation's account"]
    assert not at.sidebar.selectbox


def test_wrong_password_shows_nothing(app_with_login):
    at = _login("rita", "wrong")
    assert any("Wrong user name or password" in e.value for e in at.error)
    assert not at.sidebar.selectbox and not at.get("page_link")


def test_reader_gets_review_and_metrics_but_not_retrain_or_the_full_export(app_with_login, sample_png):
    AuditLog(app_with_login).record(file_sha256=sha256_hex(b"other"), file_name="Other^Patient_99.png",
                                    model_name="m", model_sha256=sha256_hex(b"m"), probability=0.9, threshold=0.5,
                                    decision="malignant", user="ada")
    at = _login("rita", "reader-pass")
    assert any("Signed in as rita · reader" in c.value for c in at.sidebar.caption)
    assert not any("Retrain" in link.label for link in at.get("page_link"))
    at.switch_page("pages/4_Retrain.py").run()  # a direct link: the page itself refuses a reader
    assert any("for administrators" in e.value for e in at.error) and not at.get("form")
    at.switch_page("pages/1_Review.py").run()
    assert not at.exception
    at.file_uploader[0].set_value(("scan.png", sample_png, "image/png")).run()
    rows = AuditLog(app_with_login).recent()
    assert {r["user"] for r in rows} == {"rita", "ada"}
    assert [r["user"] for r in rows if r["file_name"] == "scan.png"] == ["rita"]  # the user in each record
    labels = [b.label for b in at.get("download_button")]
    assert "Download your audit entries (CSV)" in labels and "Download the full audit log (CSV)" not in labels
    [recent] = [d.value for d in at.dataframe if "user" in d.value.columns]
    assert set(recent["user"]) == {"rita"}  # not ada's entry


def test_reader_cannot_open_retrain_even_by_running_it(app_with_login):
    at = _login("rita", "reader-pass")
    page = AppTest.from_file(str(REPO_ROOT / "pages" / "4_Retrain.py"), default_timeout=TIMEOUT)
    page.session_state["auth_user"] = at.session_state["auth_user"]
    page.run()
    assert not page.exception, [e.value for e in page.exception]
    assert any("for administrators" in e.value for e in page.error)
    assert not page.get("form")


def test_admin_gets_retrain_and_the_full_export(app_with_login, sample_png):
    AuditLog(app_with_login).record(file_sha256=sha256_hex(b"other"), file_name="x.png", model_name="m",
                                    model_sha256=sha256_hex(b"m"), probability=0.9, threshold=0.5,
                                    decision="malignant", user="rita")
    at = _login("ada", "admin-pass")
    assert any("Signed in as ada · admin" in c.value for c in at.sidebar.caption)
    assert any("Retrain" in link.label for link in at.get("page_link"))
    at.switch_page("pages/4_Retrain.py").run()
    assert not at.exception and at.get("form")
    at.switch_page("pages/1_Review.py").run()
    at.file_uploader[0].set_value(("scan.png", sample_png, "image/png")).run()
    assert "Download the full audit log (CSV)" in [b.label for b in at.get("download_button")]
    [recent] = [d.value for d in at.dataframe if "user" in d.value.columns]
    assert set(recent["user"]) == {"rita", "ada"}
    at.sidebar.button(key="sign_out").click().run()
    assert at.title[0].value == "Sign in"
