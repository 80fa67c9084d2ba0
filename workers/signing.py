"""Signed task messages: Celery's ``auth`` serializer, set up from the settings.

``MESSAGE_SIGNING=true`` makes every process that loads ``workers.app`` (workers, Flower, the
``celery`` commands) and the typed client (``workers.client``) sign the task and remote-control
messages it sends with ``SIGNING_KEY`` (``SIGNING_CERT`` names the signer), and accept only
messages signed by a certificate in ``SIGNING_CERT_STORE``.

What Celery's serializer (celery.security.serialization) puts in a message body, content type
``application/data``::

    base64( base64(signer) SEP base64(signature) SEP content_type SEP content_encoding SEP body )

with ``SEP`` = ``b"\\x00\\x01"``, ``body`` the task's JSON (``[args, kwargs, embed]``), ``signer``
the certificate's issuer and serial number, and ``signature`` RSA-PSS over ``body`` alone
(SHA-256). The content type and encoding in front of the body, and the message headers (task
name, id, eta...), are not signed. :class:`Verifier` is the worker's intake check
(``workers.intake``): it opens and verifies a signed body before anything decodes it, and
insists that what was signed is JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.settings import Settings

SIGNED_CONTENT_TYPE = "application/data"  # what Celery's auth serializer registers
SIGNED_ENCODING = "utf-8"
SEPARATOR = b"\x00\x01"
DIGEST = "sha256"
# Room for what a signed body carries besides the JSON: the signer (issuer + serial number),
# a signature of up to RSA-8192 (1 KiB), the content type, the encoding, all base64-encoded.
SIGNATURE_ROOM = 16 * 1024


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings that sign tasks and remote control, and accept only signed ones
    (empty when MESSAGE_SIGNING is off)."""
    if not settings.message_signing:
        return {}
    password = settings.signing_key_password
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": str(settings.signing_key),
        "security_certificate": str(settings.signing_cert),
        "security_cert_store": str(settings.signing_cert_store),
        "security_key_password": password.get_secret_value().encode() if password else None,
        "security_digest": DIGEST,
    }


def setup(app: Any, settings: Settings) -> None:
    """Register the ``auth`` serializer with this process's key, certificate and store (a
    process-wide kombu registry: one signing identity per process). Does nothing when
    MESSAGE_SIGNING is off; fails at once when a file is missing or unreadable."""
    if not settings.message_signing:
        return
    app.conf.update(celery_options(settings))
    # json stays enabled for results and events; "auth" by its content type (kombu's registry
    # only knows the name once the serializer is registered).
    app.setup_security(allowed_serializers=["json", SIGNED_CONTENT_TYPE], digest=DIGEST)


@dataclass(frozen=True)
class Opened:
    """A verified signed body: who signed it, and the JSON that was signed."""

    signer: str
    body: bytes


class BadSignature(Exception):
    """A signed body that does not verify: unknown signer, wrong signature, not a signed body,
    or something other than JSON signed."""


class Verifier:
    """Verifies signed task bodies against the certificates in SIGNING_CERT_STORE, as Celery
    does, but before anything decodes them, and returns the signed JSON bytes."""

    def __init__(self, cert_store: str) -> None:
        from celery.security.certificate import FSCertStore
        from celery.security.utils import get_digest_algorithm

        self.store = FSCertStore(cert_store)
        self.digest = get_digest_algorithm(DIGEST)

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier | None:
        if not settings.message_signing:
            return None
        return cls(str(settings.signing_cert_store))

    def open(self, signed: bytes) -> Opened:
        """The signed JSON of ``signed``; raises :class:`BadSignature` (never anything else)."""
        from celery.utils.serialization import b64decode

        try:
            fields = b64decode(signed).split(SEPARATOR, 4)
        except Exception as exc:
            raise BadSignature(f"not a signed message: {type(exc).__name__}") from None
        if len(fields) != 5:
            raise BadSignature("not a signed message (no signer, signature and body)")
        raw_signer, raw_signature, content_type, encoding, body = fields
        try:
            signer = b64decode(raw_signer).decode("utf-8", "replace")
            signature = b64decode(raw_signature)
        except Exception as exc:
            raise BadSignature(f"not a signed message: {type(exc).__name__}") from None
        shown = signer[:120]
        try:
            cert = self.store[signer]
        except Exception:
            raise BadSignature(
                f"signed by a certificate that is not in MODELWORKERS_SIGNING_CERT_STORE: {shown!r}"
            ) from None
        try:
            cert.verify(body, signature, self.digest)
        except Exception:
            raise BadSignature(
                f"the signature does not match the body (signer {shown!r})"
            ) from None
        if content_type != b"application/json" or encoding.lower() != b"utf-8":
            raise BadSignature(
                f"what was signed is {content_type[:60]!r} in {encoding[:20]!r}, not JSON"
            )
        return Opened(signer=signer, body=body)
