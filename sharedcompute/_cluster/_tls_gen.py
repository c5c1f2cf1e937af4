"""``sharedcompute tls-gen DIR``: a cluster CA and certificates signed by it, for a quick start.

Writes ``ca.pem`` and ``ca.key`` (the CA; keep its key off the hosts), and for each name
given (default one, ``cluster``) ``NAME.pem`` and ``NAME.key``: pass them to
``start --tls-cert NAME.pem --tls-key NAME.key --tls-ca ca.pem`` (or ``[tls]`` in a
cluster file). Keys are written mode 0600. Certificates are checked against the CA
only, not against host names (see ``_protocol/_tls``), so one certificate may serve
every host; one per host lets a host be cut off by not giving it one. Needs the
``cryptography`` package (``pip install "sharedcompute[tls]"``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

VALID_DAYS = 365


def generate(folder: str | os.PathLike[str], names: Sequence[str] = ("cluster",)) -> list[Path]:
    """Write the CA and a certificate per name into ``folder``; return the files written."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as error:
        raise RuntimeError("tls-gen needs the cryptography package: "
                           "pip install 'sharedcompute[tls]'") from error
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=VALID_DAYS)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("sharedcompute cluster CA"))
        .issuer_name(name("sharedcompute cluster CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    written = [out / "ca.pem", out / "ca.key"]
    written[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(written[1], ca_key)
    for common in names:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([
                x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
            ]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem, key_file = out / f"{common}.pem", out / f"{common}.key"
        pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        write_key(key_file, key)
        written += [pem, key_file]
    return written
