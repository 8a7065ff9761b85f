//! Stable identifiers and keys from SHA-256: output ids, cache keys, batch custom ids, review
//! ids, prompt lock hashes.

use sha2::{Digest as _, Sha256};

/// Lowercase hex of `bytes`, in one allocation.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// SHA-256 over `parts`, each length-prefixed (so ("ab", "c") and ("a", "bc") differ), as hex
/// of its first `bytes` bytes (at most 32).
pub fn of_parts(parts: &[&str], bytes: usize) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    hex(&digest[..bytes.min(digest.len())])
}

/// Hex of the first `bytes` bytes (at most 32) of SHA-256 over `data`.
pub fn of(data: &[u8], bytes: usize) -> String {
    let digest = Sha256::digest(data);
    hex(&digest[..bytes.min(digest.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_matches_the_formatter() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&bytes), expected);
    }

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(of_parts(&["ab", "c"], 16), of_parts(&["a", "bc"], 16));
        assert_eq!(of_parts(&["ab", "c"], 16).len(), 32);
        assert_eq!(of_parts(&["x"], 64).len(), 64);
    }
}
