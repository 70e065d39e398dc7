"""TLS for server and client: credentials from PEM files, with errors a person understands.

Keys and certificates come from files (made by ./gen_certs.sh for local use); a missing or
unreadable file is reported with what to do, never as a traceback.
"""

import ssl
from pathlib import Path

import grpc

GENERATE_HINT = "run ./gen_certs.sh to make a local CA and certificates in certs/"


def missing_file_hint(path: str | Path) -> str:
    """What to do about a file that is not there: a relative path (certs/ca.crt, the
    default) read from outside the step folder was most likely run from the wrong folder."""
    step_folder = Path(__file__).resolve().parent
    if not Path(path).is_absolute() and Path.cwd().resolve() != step_folder:
        return f"run it from its step folder (cd {step_folder.name}), where certs/ is"
    return GENERATE_HINT


class TlsConfigError(Exception):
    """A TLS setting points to a file that cannot be used."""


def read_pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TlsConfigError(
            f"cannot read the {what} {path}: {err.strerror}; {missing_file_hint(path)}"
        ) from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"the {what} {path} is not a PEM file")
    return data


def require_matching_pair(cert: str, key: str) -> None:
    """gRPC only finds out that a key does not belong to its certificate when it tries to
    listen, and then says just "cannot bind". Python's ssl module checks the pair now."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as err:
        raise TlsConfigError(
            f"the TLS key {key} does not belong to the certificate {cert} ({err.reason}); "
            "make them together with ./gen_certs.sh"
        ) from None


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, mutual TLS: every client must
    present a certificate signed by that CA, or the handshake fails."""
    key_pem, cert_pem = read_pem(key, "TLS key"), read_pem(cert, "TLS certificate")
    require_matching_pair(cert, key)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=read_pem(client_ca, "client CA certificate") if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: str, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Trust servers whose certificate `ca` signed (and nothing else: not even the system's
    CAs). With `cert` and `key`, present a client certificate, for mutual TLS. There is no
    way to turn verification off, on purpose."""
    if (cert is None) != (key is None):
        raise TlsConfigError("a client certificate needs both --cert and --key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "CA certificate"),
        private_key=read_pem(key, "client TLS key") if key else None,
        certificate_chain=read_pem(cert, "client certificate") if cert else None,
    )
