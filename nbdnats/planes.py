"""The two NATS connections every node holds from day one.

``data`` belongs to the core (async-nats): chunks, acks, transfer setup and events.
``ctl`` belongs to Python (nats-py): commands, queries and ctl events. Both default to the
same server; ``--data-url``/``--ctl-url`` (env ``NBDNATS_DATA_URL``/``NBDNATS_CTL_URL``,
then the nats tools' ``NATS_URL``) split them, each a comma-separated server list as the
nats tools take it.

Logins: a server URL may carry ``user:password@`` or ``token@`` (percent-encoded); the
first server of a list that carries credentials gives them to every server of that list.
``--creds FILE`` (a ``.creds`` file: JWT and seed) or ``--nkey FILE`` (an NKey seed), env
``NBDNATS_CREDS``/``NBDNATS_NKEY`` then ``NATS_CREDS``/``NATS_NKEY``, log in on both
planes instead. TLS: ``--tlscert``/``--tlskey`` (env ``NATS_CERT``/``NATS_KEY``) present a
client certificate, ``--tlsca`` (``NATS_CA``) verifies servers instead of the system's CAs.
The files are read by this process only. No password or token reaches a message: every
URL shown goes through ``redact_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import nats
from nats.aio.client import Client as CtlClient

from nbdnats import _core
from nbdnats._bridge import core_call
from nbdnats.errors import NatsError, UsageError
from nbdnats.subjects import check_token

DEFAULT_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT = 5.0
DATA_CONNECT_TIMEOUT = 30.0
# Every wait on a plane while shutting down ends within this: a server that is gone must
# not keep a finished (or interrupted) process alive.
CLOSE_TIMEOUT = 5.0

log = logging.getLogger(__name__)

# The environment, read here only: ours first, then the nats tools' own names.
DATA_URL_ENV = "NBDNATS_DATA_URL"
CTL_URL_ENV = "NBDNATS_CTL_URL"
NATS_URL_ENV = "NATS_URL"
CREDS_ENV = "NBDNATS_CREDS"
NKEY_ENV = "NBDNATS_NKEY"
# Each a (creds, nkey) pair: the first pair with either set is the login.
LOGIN_ENVS = ((CREDS_ENV, NKEY_ENV), ("NATS_CREDS", "NATS_NKEY"))
TLS_CERT_ENV = "NATS_CERT"
TLS_KEY_ENV = "NATS_KEY"
TLS_CA_ENV = "NATS_CA"


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _split_userinfo(server: str) -> tuple[str, str | None, str]:
    """``server`` as (scheme://, credentials or None, @host...). The last ``@`` ends the
    credentials wherever it is: a password may hold an unescaped ``/``, ``?`` or ``@``."""
    start = server.find("://")
    start = 0 if start < 0 else start + 3
    at = server.rfind("@", start)
    if at < 0:
        return server[:start], None, server[start:]
    return server[:start], server[start:at], server[at:]


# What redact_url looks at: each run of text between commas and white space.
_WORD = re.compile(r"[^\s,]+")


def _mask(word: re.Match[str]) -> str:
    scheme, userinfo, rest = _split_userinfo(word.group(0))
    if userinfo is None:
        return word.group(0)
    user, sep, _ = userinfo.partition(":")
    return f"{scheme}{user + ':***' if sep else '***'}{rest}"


def redact_url(url: str) -> str:
    """``url`` with the password or token of every userinfo in it masked as ``***``
    (``user:pw@`` -> ``user:***@``, ``token@`` -> ``***@``); users and hosts stay. For a
    URL, a comma-separated server list (valid or not, with or without a scheme), a URL
    inside another (restic's ``rest:https://u:pw@h/``) and text that holds them. The core
    masks its own messages the same way (tests/redact_cases.txt holds the cases of both)."""
    return _WORD.sub(_mask, url)


@dataclass(frozen=True)
class Login:
    """How a node logs in besides credentials in its URLs: a ``.creds`` file or an NKey
    seed file; and its TLS files: a client certificate and its key, and the CA that
    verifies servers (paths, read by this process when it connects; never sent anywhere)."""

    creds: str | None = None
    nkey: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def resolve(
        cls,
        creds: str | None = None,
        nkey: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> Login:
        """The files given, else those of the environment: ``--creds``/``--nkey`` (as a
        pair) from ``$NBDNATS_CREDS``/``$NBDNATS_NKEY``, else ``$NATS_CREDS``/
        ``$NATS_NKEY``; ``--tlscert``, ``--tlskey``, ``--tlsca`` each from ``$NATS_CERT``,
        ``$NATS_KEY``, ``$NATS_CA``. Every file is checked readable, and the TLS ones
        loadable, here: before anything connects."""
        where = {"--creds": "--creds", "--nkey": "--nkey"}
        if creds is None and nkey is None:
            for creds_env, nkey_env in LOGIN_ENVS:
                creds, nkey = _env(creds_env), _env(nkey_env)
                if creds or nkey:
                    where = {"--creds": f"${creds_env}", "--nkey": f"${nkey_env}"}
                    break
        if creds and nkey:
            raise UsageError(f"give {where['--creds']} or {where['--nkey']}, not both")
        files = [(where["--creds"], creds), (where["--nkey"], nkey)]
        tls = []
        for flag, value, env in (
            ("--tlscert", tls_cert, TLS_CERT_ENV),
            ("--tlskey", tls_key, TLS_KEY_ENV),
            ("--tlsca", tls_ca, TLS_CA_ENV),
        ):
            if value is None and _env(env):
                value, flag = _env(env), f"${env}"
            tls.append(value)
            files.append((flag, value))
        for option, path in files:
            if path is not None and not os.access(path, os.R_OK):
                raise UsageError(f"cannot read {option} {path}: no such readable file")
        login = cls(creds, nkey, *tls)
        login.ssl_context()
        return login

    def ssl_context(self) -> ssl.SSLContext | None:
        """The ctl plane's TLS context when a TLS file is given (else nats-py's default):
        the CA of ``--tlsca`` (else the system's), the client certificate of ``--tlscert``
        and ``--tlskey``."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError(
                "give --tlscert and --tlskey together (a client certificate and its key; "
                f"env ${TLS_CERT_ENV} and ${TLS_KEY_ENV})"
            )
        if self.tls_cert is None and self.tls_ca is None:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot use --tlsca {self.tls_ca}: {_ssl_reason(e)}") from None
        if self.tls_cert is not None:
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(
                    f"cannot use --tlscert {self.tls_cert} with --tlskey {self.tls_key}: "
                    f"{_ssl_reason(e)}"
                ) from None
        return context


def _ssl_reason(e: OSError | ssl.SSLError) -> str:
    """Why OpenSSL refused a file, in a few words (its reason, else the error's text)."""
    return str(getattr(e, "reason", None) or e.strerror or e).lower().replace("_", " ")


def _seed(path: str) -> str:
    """The user NKey seed in ``path``: its first line starting with ``SU`` (as the core
    reads it too)."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --nkey {path}: {e}") from None
    seed = next((line for line in lines if line.startswith("SU")), None)
    if seed is None:
        raise UsageError(f"--nkey {path}: no user NKey seed (a line starting with SU) in it")
    return seed


def resolve_urls(data_url: str | None, ctl_url: str | None) -> tuple[str, str]:
    """The data and ctl servers: each option, else ``$NBDNATS_DATA_URL``/
    ``$NBDNATS_CTL_URL``; the data plane then ``$NATS_URL``, then ``DEFAULT_URL``; the ctl
    plane then the data plane's."""
    data = data_url or _env(DATA_URL_ENV) or _env(NATS_URL_ENV) or DEFAULT_URL
    ctl = ctl_url or _env(CTL_URL_ENV) or data
    return data, ctl


def urls_given(data_url: str | None, ctl_url: str | None) -> bool:
    """Whether a server is named, by an option or the environment (else ``copy`` and
    ``migrate`` start an embedded one)."""
    return bool(
        data_url or ctl_url or _env(DATA_URL_ENV) or _env(CTL_URL_ENV) or _env(NATS_URL_ENV)
    )


def default_node() -> str:
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64]
    return cleaned or "node"


async def connect_data(url: str, name: str, login: Login | None = None) -> _core.DataConnection:
    login = login or Login()
    handle_fut = core_call(
        lambda done: _core.connect(
            url,
            name,
            done,
            creds=login.creds,
            nkey=login.nkey,
            tls_cert=login.tls_cert,
            tls_key=login.tls_key,
            tls_ca=login.tls_ca,
        )
    )[1]
    try:
        # The core bounds each attempt; this bounds them all, whatever the server list.
        conn = await asyncio.wait_for(handle_fut, DATA_CONNECT_TIMEOUT)
    except TimeoutError:
        raise NatsError(
            f"cannot connect to NATS at {redact_url(url)}: no answer within "
            f"{DATA_CONNECT_TIMEOUT:.0f} s; check --data-url and that nats-server is running"
        ) from None
    assert isinstance(conn, _core.DataConnection)
    return conn


def _ctl_auth(url: str, login: Login) -> tuple[list[str], dict[str, Any]]:
    """The servers of ``url`` without credentials, and nats.connect's login options: the
    first credentials in the list (percent-decoded, for every server, discovered ones
    too), or the login's files; and its TLS context, if it has TLS files."""
    servers: list[str] = []
    auth: dict[str, Any] = {}
    for server in (s.strip() for s in url.split(",")):
        if not server:
            continue
        scheme, userinfo, rest = _split_userinfo(server)
        servers.append(scheme + rest[1:] if userinfo is not None else server)
        if userinfo is not None and not auth:
            user, sep, password = userinfo.partition(":")
            auth = (
                {"user": unquote(user), "password": unquote(password)}
                if sep
                else {"token": unquote(user)}
            )
    if auth and (login.creds or login.nkey):
        raise UsageError(
            f"the ctl URL {redact_url(url)} carries credentials and --creds/--nkey is "
            "given too; use one"
        )
    if login.creds:
        auth = {"user_credentials": login.creds}
    elif login.nkey:
        auth = {"nkeys_seed_str": _seed(login.nkey)}
    context = login.ssl_context()
    if context is not None:
        auth["tls"] = context
    return servers, auth


def _connect_hint(error: str, tls_without_cert: bool = False) -> str:
    """What to check after a failed connect, by what nats-py said (the core says the same
    for the data plane)."""
    if "CERTIFICATE_REQUIRED" in error:
        return "the server asks for a client certificate: give --tlscert and --tlskey"
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return (
            "the server's certificate is not signed by a CA this host trusts: give its CA "
            "with --tlsca"
        )
    closed = ("Broken pipe", "reset", "EOF", "closed")
    if tls_without_cert and any(c in error for c in closed):
        # TLS 1.3: the server checks the client's certificate after the client's side of
        # the handshake is done, so its alert can be lost to the reset that follows.
        return (
            "the server closed the TLS connection; if it verifies clients, give --tlscert "
            "and --tlskey"
        )
    return "check --ctl-url, the credentials and that nats-server is running"


async def connect_ctl(url: str, name: str, login: Login | None = None) -> CtlClient:
    login = login or Login()
    servers, auth = _ctl_auth(url, login)

    failures: list[Exception] = []

    async def quiet(e: Exception) -> None:  # reconnects are reported by state, not logs
        if len(failures) < 8:
            failures.append(e)

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                # A few quick tries: each may lose the server's reason to a reset.
                max_reconnect_attempts=2,
                reconnect_time_wait=0.2,
                error_cb=quiet,
                **auth,
            ),
            CONNECT_TIMEOUT,
        )
    except (OSError, TimeoutError, ValueError, nats.errors.Error) as e:
        # "no servers available" hides why: a refusal (a bad login) says it. The server
        # sends its -ERR and closes; the client may see only the reset that follows, so
        # an authorization error seen on any attempt is the one to name. A timeout hides
        # it too: a failed TLS handshake (an unknown CA) is retried until then.
        cause: BaseException = e
        if isinstance(e, nats.errors.NoServersError | TimeoutError) and failures:
            refused = [
                f for f in failures if "authoriz" in str(f).lower() or "CERTIFICATE_" in str(f)
            ]
            cause = (refused or failures)[-1]
        detail = redact_url(str(cause) or type(cause).__name__)
        raise NatsError(
            f"cannot connect to the ctl NATS server at {redact_url(url)}: {detail}; "
            f"{_connect_hint(detail, 'tls' in auth and login.tls_cert is None)}"
        ) from None
    # The first connect fails fast (one round of attempts); once connected, ride out any
    # server loss: nats-py reads these options at each reconnect.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 1.0
    return nc


@dataclass
class Planes:
    """Both connections of one node, and its name on the ctl plane."""

    data: _core.DataConnection
    ctl: CtlClient
    node: str

    @classmethod
    async def connect(
        cls,
        data_url: str | None = None,
        ctl_url: str | None = None,
        node: str | None = None,
        login: Login | None = None,
    ) -> Planes:
        """Both planes, each logged in with the credentials in its URL or with ``login``
        (default: ``Login.resolve()``, the environment's)."""
        data, ctl = resolve_urls(data_url, ctl_url)
        node = check_token(node or default_node(), "node name")
        login = login or Login.resolve()
        data_conn = await connect_data(data, f"nbd-nats {node} data", login)
        ctl_conn = await connect_ctl(ctl, f"nbd-nats {node} ctl", login)
        return cls(data=data_conn, ctl=ctl_conn, node=node)

    _ctl_lost: bool = field(default=False, init=False, repr=False)

    def ctl_lost(self, what: str) -> None:
        """Say once (a warning) that the ctl plane is gone and what was skipped for it. The
        ctl plane reports; it never decides a transfer's outcome."""
        if not self._ctl_lost:
            self._ctl_lost = True
            log.warning("the ctl plane was lost; %s", what)

    async def ctl_publish(self, subject: str, payload: bytes, what: str) -> None:
        """Publish on the ctl plane if it is there, within ``CLOSE_TIMEOUT``; else skip it
        (``ctl_lost``). Never raises: nats-py would queue it for a server that may never
        come back, or raise from a closed connection."""
        if not self.ctl.is_connected:
            self.ctl_lost(f"{what} was not published")
            return
        try:
            await asyncio.wait_for(self.ctl.publish(subject, payload), CLOSE_TIMEOUT)
        except Exception:
            self.ctl_lost(f"{what} was not published")

    async def close(self) -> None:
        """Flush the data plane and drain the ctl plane, each within ``CLOSE_TIMEOUT``.
        Never raises and never hangs: a plane whose server is gone is let go."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(core_call(self.data.flush)[1], CLOSE_TIMEOUT)
        if self.ctl.is_closed:
            return
        if self.ctl.is_connected:
            try:
                await asyncio.wait_for(self.ctl.drain(), CLOSE_TIMEOUT)
            except Exception:
                self.ctl_lost("its last messages may not have been delivered")
            else:
                return
        # Reconnecting (its server is gone) or a drain that failed: close without waiting
        # for a server, which also stops the reconnect loop.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ctl.close(), CLOSE_TIMEOUT)
