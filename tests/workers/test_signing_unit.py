"""Signed task bodies at the worker's intake (workers/intake.py + workers/signing.py), on
messages built in memory: what is checked before the signature, the signature, and after it."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from kombu.message import Message
from pydantic import ValidationError

from harness.signing import Identity, cert_store, make_identity, sign_body
from shared.settings import Settings
from tests.reliability.hostile import body, nested, task_headers
from workers.intake import MessageLimits, Refused, check_task_message
from workers.signing import SEPARATOR, Verifier, celery_options

LIMITS = MessageLimits(max_bytes=4096, max_depth=8, max_args=4, signed=True)
DATA = [[[[1.0, 2.0]]], {"model": "m"}, {"callbacks": None, "errbacks": None, "chain": None}]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    pytest.importorskip("cryptography", reason="signing needs the cryptography package")
    folder = tmp_path_factory.mktemp("keys")
    found = {name: make_identity(folder, name) for name in ("client", "mallory")}
    cert_store(folder / "store", found["client"])
    return found


@pytest.fixture(scope="module")
def verifier(keys: dict[str, Identity]) -> Verifier:
    return Verifier(str(keys["client"].cert.parent / "store"))


def message(raw: bytes, content_type: str = "application/data") -> Message:
    return Message(
        body=raw,
        content_type=content_type,
        content_encoding="utf-8",
        headers=task_headers("t"),
        properties={"delivery_tag": "1"},
        delivery_info={"exchange": "", "routing_key": "q"},
    )


def refusal(msg: Message, verifier: Verifier) -> Refused:
    with pytest.raises(Refused) as info:
        check_task_message(msg, LIMITS, verifier.open)
    assert msg._decoded_cache is None  # refused before anything decoded it
    return info.value


def swap_field(signed: bytes, index: int, value: bytes) -> bytes:
    fields = base64.b64decode(signed).split(SEPARATOR, 4)
    fields[index] = value
    return base64.b64encode(SEPARATOR.join(fields))


def test_a_body_signed_by_a_trusted_certificate_passes_and_is_decoded(
    keys: dict[str, Identity], verifier: Verifier
) -> None:
    from celery.security.serialization import register_auth
    from kombu.serialization import registry

    register_auth(store=str(keys["client"].cert.parent / "store"))  # the worker's decoder
    try:
        msg = message(sign_body(keys["client"], DATA))
        check_task_message(msg, LIMITS, verifier.open)
    finally:
        registry.unregister("auth")
    assert msg._decoded_cache == DATA
    opened = verifier.open(sign_body(keys["client"], DATA))
    assert opened.signer.startswith("client ") and opened.body == body(*DATA)


def test_unsigned_and_wrongly_signed_bodies_are_refused_with_what_is_wrong(
    keys: dict[str, Identity], verifier: Verifier
) -> None:
    client, mallory = keys["client"], keys["mallory"]
    unsigned = refusal(message(body(*DATA), "application/json"), verifier)
    assert unsigned.reason == "unsigned" and "not signed" in str(unsigned)
    stranger = refusal(message(sign_body(mallory, DATA)), verifier)
    assert stranger.reason == "bad_signature"
    assert "not in MODELWORKERS_SIGNING_CERT_STORE: 'mallory " in str(stranger)
    forged = refusal(message(sign_body(mallory, DATA, as_signer=client)), verifier)
    assert "the signature does not match the body (signer 'client " in str(forged)
    signed = sign_body(client, DATA)
    tampered = swap_field(signed, 4, body(*DATA).replace(b"1.0", b"9.0"))
    assert "does not match" in str(refusal(message(tampered), verifier))
    assert "not a signed message" in str(refusal(message(b"bm9wZQ=="), verifier))
    # The content type in front of the body is not signed: only JSON is taken from it.
    as_yaml = swap_field(signed, 2, b"application/x-yaml")
    assert "not JSON" in str(refusal(message(as_yaml), verifier))


def test_sizes_are_checked_before_the_signature_and_depth_after_it(
    keys: dict[str, Identity], verifier: Verifier
) -> None:
    client = keys["client"]
    huge = message(b"A" * (LIMITS.body_bytes + 1))
    assert "a signed body of" in str(refusal(huge, verifier))
    too_big = sign_body(client, [["x" * 5000], {}, {}])  # fits signed, not as JSON
    assert len(too_big) <= LIMITS.body_bytes
    assert "more than the limit of 4,096 (MODELWORKERS_MAX_MESSAGE_BYTES)" in str(
        refusal(message(too_big), verifier)
    )
    deep = refusal(message(sign_body(client, [[nested(8)], {}, {}])), verifier)
    assert "args nested 9 levels deep" in str(deep)


def test_a_signed_body_is_refused_when_signing_is_off(keys: dict[str, Identity]) -> None:
    plain = MessageLimits(max_bytes=4096, max_depth=8, max_args=4)
    with pytest.raises(Refused, match="content type 'application/data' is not accepted"):
        check_task_message(message(sign_body(keys["client"], DATA)), plain)


def test_signing_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match="MODELWORKERS_SIGNING_KEY, MODELWORKERS_SIGNING_CERT_STORE not set"
    ):
        Settings(message_signing=True, signing_cert=tmp_path / "c.pem")
    assert celery_options(Settings()) == {}
    options = celery_options(
        Settings(
            message_signing=True,
            signing_key=tmp_path / "k",
            signing_cert=tmp_path / "c",
            signing_cert_store=tmp_path,
        )
    )
    assert options["task_serializer"] == "auth" and options["accept_content"] == ["auth"]
