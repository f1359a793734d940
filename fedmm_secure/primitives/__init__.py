"""Pure cryptographic and numeric building blocks: no torch, no I/O, nothing of ours imported.

* :mod:`.keys`: typed Ed25519 / X25519 / symmetric key objects (HKDF with explicit contexts)
* :mod:`.aead`: AES-256-GCM ``seal`` / ``open_sealed``
* :mod:`.prg`: AES-256-CTR mask expansion into ring elements
* :mod:`.digest`: BLAKE3 digest of bulk payloads (hash-then-sign of megabyte messages)
* :mod:`.shamir`: t-of-n Shamir sharing of 32-byte secrets
* :mod:`.quantization`: fixed-point encoding into Z_2^k with overflow impossible by construction

(``ckks`` is imported on its own because it needs the optional TenSEAL dependency.)
"""

from .aead import open_sealed, seal
from .digest import BulkHasher, bulk_digest
from .keys import (AgreementPrivateKey, AgreementPublicKey, IdentityPrivateKey, IdentityPublicKey,
                   SymmetricKey)
from .prg import accumulate_masks, expand
from .quantization import Quantizer, make_quantizer
from .shamir import Share, recover_secret, split_secret

__all__ = [
    "AgreementPrivateKey", "AgreementPublicKey", "IdentityPrivateKey", "IdentityPublicKey",
    "SymmetricKey", "seal", "open_sealed", "expand", "accumulate_masks", "Quantizer",
    "make_quantizer", "Share", "split_secret", "recover_secret", "BulkHasher", "bulk_digest",
]
