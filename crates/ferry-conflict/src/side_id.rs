//! The ids of side rows (activity, conflicts) name the client whose
//! write made them. Client ids may be up to 256 bytes, as long as a row id
//! may be: a long one is replaced by a digest, so the side row's id stays
//! within the limit (its `client_id` column keeps the whole id).

use std::borrow::Cow;

/// Longest client id a side row's id carries as it is.
pub const MAX_CLIENT_ID_IN_ID_BYTES: usize = 64;

/// The client's part of a side row's id: the client id, or a 128-bit
/// digest of it (32 hex digits) when it is longer than
/// [`MAX_CLIENT_ID_IN_ID_BYTES`].
pub fn client_key(client_id: &str) -> Cow<'_, str> {
    if client_id.len() <= MAX_CLIENT_ID_IN_ID_BYTES {
        Cow::Borrowed(client_id)
    } else {
        let bytes = client_id.as_bytes();
        Cow::Owned(format!("{:016x}{:016x}", fnv1a64(bytes, 0), fnv1a64(bytes, 1)))
    }
}

/// FNV-1a over `bytes`, seeded (two seeds give a 128-bit digest).
fn fnv1a64(bytes: &[u8], seed: u8) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(seed);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_client_ids_become_distinct_digests() {
        assert_eq!(client_key("c1"), "c1");
        let a = client_key(&"a".repeat(256)).into_owned();
        let b = client_key(&format!("{}b", "a".repeat(255))).into_owned();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_eq!(client_key(&"x".repeat(64)), "x".repeat(64));
    }
}
