"""Signing identities for the tests and the benchmark: an RSA key and a self-signed certificate,
made with ``cryptography`` (what ``openssl req -x509 -newkey rsa:2048 -nodes`` makes), and the
settings that make a process sign with them (MESSAGE_SIGNING)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    """One signer's files: its private key, its certificate."""

    name: str
    key: Path
    cert: Path

    def env(self, store: Path) -> dict[str, str]:
        """The settings of a process that signs as this identity and trusts ``store``."""
        return {
            "MODELWORKERS_MESSAGE_SIGNING": "true",
            "MODELWORKERS_SIGNING_KEY": str(self.key),
            "MODELWORKERS_SIGNING_CERT": str(self.cert),
            "MODELWORKERS_SIGNING_CERT_STORE": str(store),
        }


def make_identity(
    folder: Path, name: str, *, bits: int = 2048, serial: int | None = None
) -> Identity:
    """A new RSA key and a self-signed certificate for ``CN=name``, valid for a day, written to
    ``folder/name.key`` and ``folder/name.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(name=name, key=key_path, cert=cert_path)


def cert_store(folder: Path, *identities: Identity) -> Path:
    """A folder holding the certificates of ``identities``: a SIGNING_CERT_STORE."""
    folder.mkdir(parents=True, exist_ok=True)
    for identity in identities:
        (folder / identity.cert.name).write_bytes(identity.cert.read_bytes())
    return folder


def sign_body(identity: Identity, data: object, *, as_signer: Identity | None = None) -> bytes:
    """``data`` as Celery's auth serializer signs it with ``identity``'s key; ``as_signer``
    names another certificate as the signer (a forged claim)."""
    from celery.security.certificate import Certificate
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    serializer = SecureSerializer(
        PrivateKey(identity.key.read_text()),
        Certificate((as_signer or identity).cert.read_text()),
        None,
    )
    signed: str | bytes = serializer.serialize(data)
    return signed.encode() if isinstance(signed, str) else signed
