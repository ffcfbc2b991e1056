"""Ed25519 signatures over a bundle's ``edgetl.json``, the one place edgetl touches ``cryptography``.

``edgetl keygen`` makes a key pair, ``edgetl sign`` writes ``edgetl.json.sig`` (the 64 raw signature bytes) beside
the manifest, and a runtime loaded with ``public_key`` refuses a manifest that is unsigned or does not match its
signature. The manifest lists every file with its sha256, which the runtime checks before it opens a model, so the
signature covers every file. ``cryptography`` is imported only when a key is used: an app that checks no signature
does not need it (the ``sign`` extra).
"""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import write_bytes_atomic
from edgetl.errors import MissingDependencyError, SignatureError, UsageError

# A public key as ``load(..., public_key=...)`` takes it: the path of a PEM file, or the PEM bytes themselves (an app
# may embed its key in code).
PublicKey = str | Path | bytes


def _crypto():
    """``cryptography``'s exceptions, serialization and ed25519 modules, or MissingDependencyError."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError("cryptography", "sign", "signing or verifying a bundle") from None
    return exceptions, serialization, ed25519


def signature_path(manifest_path: Path) -> Path:
    """Where a manifest's signature lives: beside it, ``.sig`` added."""
    return manifest_path.with_name(manifest_path.name + ".sig")


def generate_key_pair(private_path: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: the private key at ``private_path`` (PEM, unencrypted, readable by its owner only)
    and the public key beside it with ``.pub`` added. Refuses to overwrite either file."""
    exceptions, serialization, ed25519 = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if not private_path.parent.is_dir():
        raise UsageError(f"keygen: folder {private_path.parent} does not exist")
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"keygen: {path} exists; edgetl never overwrites a key (move it away or pick another name)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes_atomic(private_path, private_pem, mode=0o600)
    write_bytes_atomic(public_path, public_pem)
    return private_path, public_path


def sign_manifest(manifest: bytes, private_key: str | Path) -> bytes:
    """The Ed25519 signature of a manifest's bytes under the private key in a PEM file."""
    return _load_key(private_key, private=True).sign(manifest)


def verify_manifest(manifest_path: Path, manifest: bytes, public_key: PublicKey) -> None:
    """Raise SignatureError unless the signature beside ``manifest_path`` is ``public_key``'s over ``manifest`` (the
    bytes read from that path)."""
    exceptions = _crypto()[0]
    key = _load_key(public_key, private=False)
    signature = signature_path(manifest_path)
    where = manifest_path.parent
    if not signature.is_file():
        raise SignatureError(f"{where}: {manifest_path.name} is not signed (no {signature.name}), and a public key was "
                             f"given: sign the bundle with 'edgetl sign', or load it without a key")
    try:
        key.verify(signature.read_bytes(), manifest)
    except exceptions.InvalidSignature:
        raise SignatureError(f"{where}: {manifest_path.name} does not match its signature {signature.name} under the "
                             f"given public key: the manifest was altered, or signed with another key") from None


def _load_key(source: PublicKey, private: bool):
    """An Ed25519 key from a PEM file (a path) or PEM bytes; UsageError naming the source if it is none."""
    exceptions, serialization, ed25519 = _crypto()
    kind = "private" if private else "public"
    name = "(PEM bytes)" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    elif Path(source).is_file():
        data = Path(source).read_bytes()
    else:
        raise UsageError(f"{kind} key {name}: file not found")
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError, exceptions.UnsupportedAlgorithm) as exc:
        raise UsageError(f"{kind} key {name}: not an unencrypted PEM {kind} key ({exc})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise UsageError(f"{kind} key {name}: an {type(key).__name__}, not an Ed25519 key (make one with 'edgetl keygen')")
    return key
