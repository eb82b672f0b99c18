"""A PAdES B-B CMS signature (``/SubFilter /ETSI.CAdES.detached``, SHA-256) assembled from cached parts.

Why not pyHanko's CMS builder per document: it builds and DER-encodes the whole SignedData through
asn1crypto objects (certificates included) twice per document, which is most of a signature's cost.
Everything in our SignedData is fixed per signing key except two things: the document's SHA-256 (inside
the signed attributes) and the raw signature value. So :class:`CmsTemplate` encodes the fixed parts once
per process with asn1crypto (certificates, signer identifier, algorithm identifiers, the content-type
and ESS signing-certificate-v2 attributes) and :meth:`CmsTemplate.signed_data` splices the two per
document values in with a few bytes of DER framing.

The signed attributes are exactly PAdES B-B's: content-type (id-data), message-digest and
signing-certificate-v2; no signing-time (PAdES puts the time in the signature dictionary's ``/M``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from asn1crypto import tsp  # noqa: F401 - registers the ESS signing-certificate-v2 attribute with cms
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


def der(tag: int, content: bytes) -> bytes:
    """One DER TLV: ``tag`` (a single identifier octet) and definite length."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


_SEQUENCE, _SET, _OCTET_STRING, _CONTEXT_0 = 0x30, 0x31, 0x04, 0xA0
_MESSAGE_DIGEST_OID = core.ObjectIdentifier("1.2.840.113549.1.9.4").dump()
_SUPPORTED = ("rsassa_pkcs1v15", "ecdsa")


def _attribute(kind: str, value: object) -> bytes:
    return cms.CMSAttribute({"type": kind, "values": [value]}).dump()


@dataclass(frozen=True)
class CmsTemplate:
    """Everything of our SignedData that doesn't depend on the document, DER-encoded once."""

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    mechanism: str  # rsassa_pkcs1v15 | ecdsa
    fixed_attributes: tuple[bytes, ...]  # content-type and signing-certificate-v2, encoded
    signer_info_head: bytes  # version, sid, digestAlgorithm
    signature_algorithm: bytes
    signed_data_head: bytes  # version, digestAlgorithms, encapContentInfo, certificates

    @classmethod
    def build(cls, private_key: object, signature_algorithm: algos.SignedDigestAlgorithm,
              certificate: asn1_x509.Certificate,
              chain: tuple[asn1_x509.Certificate, ...]) -> CmsTemplate | None:
        """The template for this key, or ``None`` when the key or mechanism is not one we splice
        (RSA PKCS#1 v1.5 and ECDSA are; the signer refuses other keys when it loads them)."""
        mechanism = signature_algorithm.signature_algo
        if mechanism not in _SUPPORTED or not isinstance(
                private_key, rsa.RSAPrivateKey if mechanism == "rsassa_pkcs1v15" else ec.EllipticCurvePrivateKey):
            return None
        digest_algorithm = algos.DigestAlgorithm({"algorithm": "sha256"}).dump()
        ess = {"certs": [{
            "hash_algorithm": {"algorithm": "sha256"},
            "cert_hash": hashlib.sha256(certificate.dump()).digest(),
            "issuer_serial": {
                "issuer": [asn1_x509.GeneralName({"directory_name": certificate.issuer})],
                "serial_number": certificate.serial_number,
            },
        }]}
        fixed_attributes = (_attribute("content_type", "data"), _attribute("signing_certificate_v2", ess))
        sid = cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": certificate.issuer, "serial_number": certificate.serial_number}}).dump()
        certificates = b"".join(cert.dump() for cert in (certificate, *chain))
        signed_data_head = (
            core.Integer(1).dump()
            + der(_SET, digest_algorithm)
            + cms.EncapsulatedContentInfo({"content_type": "data"}).dump()
            + der(_CONTEXT_0, certificates)
        )
        return cls(
            private_key=private_key,  # type: ignore[arg-type]
            mechanism=mechanism,
            fixed_attributes=fixed_attributes,
            signer_info_head=core.Integer(1).dump() + sid + digest_algorithm,
            signature_algorithm=signature_algorithm.dump(),
            signed_data_head=signed_data_head,
        )

    def signed_attributes(self, document_digest: bytes) -> bytes:
        """The SET OF attributes as signed (DER: members sorted by their encoding)."""
        message_digest = der(_SEQUENCE, _MESSAGE_DIGEST_OID + der(_SET, der(_OCTET_STRING, document_digest)))
        return der(_SET, b"".join(sorted((*self.fixed_attributes, message_digest))))

    def _sign(self, data: bytes) -> bytes:
        if self.mechanism == "rsassa_pkcs1v15":
            return self.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]

    def signed_data(self, document_digest: bytes) -> bytes:
        """The DER ContentInfo (SignedData) for a document whose signed byte ranges hash to ``document_digest``."""
        attributes = self.signed_attributes(document_digest)
        signature = self._sign(attributes)
        signer_info = der(_SEQUENCE, self.signer_info_head
                          + bytes((_CONTEXT_0,)) + attributes[1:]  # [0] IMPLICIT: same content, own tag
                          + self.signature_algorithm
                          + der(_OCTET_STRING, signature))
        signed_data = der(_SEQUENCE, self.signed_data_head + der(_SET, signer_info))
        return der(_SEQUENCE, cms.ContentType("signed_data").dump() + der(_CONTEXT_0, signed_data))
