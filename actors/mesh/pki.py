"""The network key: a per-mesh Ed25519 CA that signs node certificates, and their checks.

Why a CA: the standard ``ssl`` module can only verify a client certificate against a CA it has
loaded (there is no hook to accept a pinned raw key during the handshake). So membership of a
mesh is "holds a certificate signed by this mesh's CA key", checked by OpenSSL on both sides
during the TLS 1.3 handshake, and identity is "the certificate's Ed25519 key derives (or, after
a rotation, is the current key of) the peer id in its subject", checked by us right after.

Node certificates: subject CN = peer id, SAN URI ``symbiote://<peer id>``, the node's own
Ed25519 key, EKU serverAuth + clientAuth (every node both dials and accepts).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from symbiote.actors.mesh.identity import KeyRing, NodeIdentity, peer_id_for
from symbiote.schema.mesh import HandshakeFailed, IdentityError, PeerMismatch, UnknownKey

__all__ = ["MeshCA", "NodeCredentials", "peer_from_certificate"]

_SKEW = dt.timedelta(minutes=5)


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class MeshCA:
    """A mesh's network key. Whoever holds it admits nodes; keep it off the nodes if you can."""

    def __init__(self, private_key: Ed25519PrivateKey, certificate: x509.Certificate) -> None:
        self._key = private_key
        self.certificate = certificate

    @classmethod
    def generate(cls, mesh: str, *, valid_days: int = 3650) -> MeshCA:
        """A new CA for the mesh named ``mesh``."""
        key = Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"symbiote mesh {mesh}")])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, None)
        )
        return cls(key, cert)

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate (public; every node loads it)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The CA private key as PKCS#8 PEM, encrypted if ``password`` is given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes, password: bytes | None = None) -> MeshCA:
        """Load a CA saved with :meth:`private_key_pem` and :attr:`certificate_pem`."""
        key = serialization.load_pem_private_key(key_pem, password)
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError("the network key must be Ed25519", field="network_key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem))

    def issue(self, identity: NodeIdentity, *, valid_days: int = 365) -> bytes:
        """A PEM certificate binding ``identity``'s peer id to its current key."""
        now = dt.datetime.now(dt.UTC)
        pub = identity.private_key().public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"symbiote://{identity.peer_id}")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(self._key, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)


class NodeCredentials:
    """What a node needs to join a mesh: its identity, its certificate and the CA certificate."""

    def __init__(self, identity: NodeIdentity, certificate_pem: bytes, ca_pem: bytes) -> None:
        cert = x509.load_pem_x509_certificate(certificate_pem)
        pub = cert.public_key()
        if not isinstance(pub, Ed25519PublicKey) or _raw(pub) != identity.public_key:
            raise IdentityError(
                "certificate is not for this node's current key", field="certificate"
            )
        self.identity = identity
        self.certificate_pem = certificate_pem
        self.ca_pem = ca_pem

    @classmethod
    def issue(cls, ca: MeshCA, identity: NodeIdentity) -> NodeCredentials:
        """Credentials for ``identity`` signed by ``ca`` (tests and single-operator meshes)."""
        return cls(identity, ca.issue(identity), ca.certificate_pem)

    def ssl_context(self, *, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that requires and verifies the peer's certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # Identity is the peer id in the certificate, checked after the handshake; hostnames
        # mean nothing in a mesh where nodes move between addresses.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection re-authenticates
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        self._load_chain(ctx)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        # ssl can only load a key from a file. The key is written there encrypted under a
        # random one-time password, in a private temporary directory removed at once, so the
        # clear key never touches the disk.
        password = os.urandom(32).hex().encode()
        key_pem = self.identity.private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        with tempfile.TemporaryDirectory(prefix="symbiote-tls-") as tmp:
            cert_path = Path(tmp) / "node.crt"
            key_path = Path(tmp) / "node.key"
            cert_path.write_bytes(self.certificate_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            ctx.load_cert_chain(str(cert_path), str(key_path), password=password)


def peer_from_certificate(der: bytes | None, keyring: KeyRing | None = None) -> tuple[str, bytes]:
    """The (peer id, raw public key) a verified peer certificate proves.

    OpenSSL has already checked the CA signature and validity dates; this checks that the key
    belongs to the peer id in the subject: either it derives it (a node that never rotated) or
    ``keyring`` knows it as that peer's current key.
    """
    if not der:
        raise HandshakeFailed("peer sent no certificate", field="certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise HandshakeFailed(f"unreadable peer certificate: {exc}", field="certificate") from exc
    pub = cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise HandshakeFailed("peer certificate key is not Ed25519", field="certificate")
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise HandshakeFailed("peer certificate has no single peer id", field="certificate")
    claimed, raw = cns[0].value, _raw(pub)
    if peer_id_for(raw) == claimed:
        return claimed, raw
    if keyring is not None:
        try:
            keys = keyring.get(claimed)
        except UnknownKey:
            keys = None
        if keys is not None and keys.current.public_key == raw:
            keys.confirm(raw)
            return claimed, raw
    raise PeerMismatch(
        f"certificate key does not belong to peer {claimed[:32]!r}", field="certificate"
    )
