//! The digest both key/value guests keep of their state: the number of pairs and an
//! additive multiset hash of the pairs (AdHash): each pair's BLAKE3 hash, expanded by
//! BLAKE3's extendable output into a 4096-bit number, summed modulo 2^4096. Summing (rather
//! than chaining) makes it O(1) to update and equal for equal contents whatever history
//! produced them. With a cryptographic hash under a 4096-bit sum, crafting two different
//! sets of pairs with the same digest takes a generalised-birthday search of about 2^128
//! work (Wagner: about 2^(2*sqrt(4096))); the previous wrapping sum of 128-bit XXH3 hashes
//! was easy to collide on purpose (XXH3 is not meant to resist crafted inputs, and a
//! generalised-birthday search on a 128-bit sum is cheap). A lattice hash (1024 lanes of
//! 16 bits, 2 KiB per pair) was measured too: its apply cost was about a quarter higher
//! again. How a pair is encoded is each guest's own (a string key in kvstore, a slot
//! number in diskstorage); [`pair_seed`] hashes the encoding.

/// 64-bit limbs of the sum: a 4096-bit integer.
const LIMBS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    count: u64,
    /// Little-endian limbs of the sum modulo 2^4096.
    sum: [u64; LIMBS],
}

impl Default for Digest {
    fn default() -> Self {
        Digest { count: 0, sum: [0; LIMBS] }
    }
}

/// A pair's 256-bit hash: what [`Digest::add`] expands into a 4096-bit number. Each part
/// is written whole after its length, so no two pairs of parts give the same input.
pub fn pair_seed(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// The pair's 4096-bit number: BLAKE3 in extendable-output mode, keyed by its seed.
fn expand(seed: &[u8; 32]) -> [u64; LIMBS] {
    let mut bytes = [0u8; LIMBS * 8];
    blake3::Hasher::new_keyed(seed).finalize_xof().fill(&mut bytes);
    let mut limbs = [0u64; LIMBS];
    for (limb, b) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
        *limb = u64::from_le_bytes(b.try_into().unwrap_or_default());
    }
    limbs
}

fn add_into(sum: &mut [u64; LIMBS], v: &[u64; LIMBS]) {
    let mut carry = false;
    for (s, x) in sum.iter_mut().zip(v) {
        let (r, c1) = s.overflowing_add(*x);
        let (r, c2) = r.overflowing_add(u64::from(carry));
        *s = r;
        carry = c1 || c2;
    }
}

fn sub_from(sum: &mut [u64; LIMBS], v: &[u64; LIMBS]) {
    let mut borrow = false;
    for (s, x) in sum.iter_mut().zip(v) {
        let (r, b1) = s.overflowing_sub(*x);
        let (r, b2) = r.overflowing_sub(u64::from(borrow));
        *s = r;
        borrow = b1 || b2;
    }
}

impl Digest {
    /// Count (8 bytes) then the BLAKE3 hash of the sum (32 bytes).
    pub const LEN: usize = 40;

    /// A pair with this seed joined the state.
    pub fn add(&mut self, seed: &[u8; 32]) {
        self.count += 1;
        add_into(&mut self.sum, &expand(seed));
    }

    /// A pair with this seed left the state (it must have been added).
    pub fn remove(&mut self, seed: &[u8; 32]) {
        self.count -= 1;
        sub_from(&mut self.sum, &expand(seed));
    }

    /// A pair changed: the one with seed `old` left, the one with seed `new` joined.
    pub fn replace(&mut self, old: &[u8; 32], new: &[u8; 32]) {
        sub_from(&mut self.sum, &expand(old));
        add_into(&mut self.sum, &expand(new));
    }

    pub fn count(self) -> u64 {
        self.count
    }

    /// Count LE (8 bytes), then BLAKE3 of the sum's limbs, each LE (32 bytes): the sum is
    /// compressed only here, so an update costs no hash of the whole number.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut limbs = [0u8; LIMBS * 8];
        for (out, limb) in limbs.chunks_exact_mut(8).zip(self.sum) {
            out.copy_from_slice(&limb.to_le_bytes());
        }
        let mut bytes = [0; Self::LEN];
        bytes[..8].copy_from_slice(&self.count.to_le_bytes());
        bytes[8..].copy_from_slice(blake3::hash(&limbs).as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_removal_undoes() {
        let (one, two, three) = (pair_seed(&[b"a", b"1"]), pair_seed(&[b"b", b"2"]), pair_seed(&[b"c", b"3"]));
        let mut a = Digest::default();
        a.add(&one);
        a.add(&two);
        let mut b = Digest::default();
        b.add(&two);
        b.add(&three);
        b.add(&one);
        b.remove(&three);
        assert_eq!(a, b);
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(a.count(), 2);
        assert_eq!(a.to_bytes()[..8], 2u64.to_le_bytes());
        assert_ne!(a.to_bytes(), Digest::default().to_bytes());
        b.remove(&one);
        b.remove(&two);
        assert_eq!(b, Digest::default());
    }

    #[test]
    fn carries_and_borrows_cross_limbs() {
        let mut sum = [u64::MAX; LIMBS];
        let mut one = [0u64; LIMBS];
        one[0] = 1;
        add_into(&mut sum, &one);
        assert_eq!(sum, [0; LIMBS], "2^4096 - 1 + 1 wraps to 0");
        sub_from(&mut sum, &one);
        assert_eq!(sum, [u64::MAX; LIMBS]);
    }

    #[test]
    fn parts_are_delimited() {
        assert_ne!(pair_seed(&[b"ab", b"c"]), pair_seed(&[b"a", b"bc"]));
        assert_ne!(pair_seed(&[b"a", b""]), pair_seed(&[b"", b"a"]));
    }

    /// The same pair added twice is not the same as another pair once: the lanes are
    /// not a set of bits that could cancel.
    #[test]
    fn a_pair_twice_differs_from_other_pairs() {
        let (one, two) = (pair_seed(&[b"a", b"1"]), pair_seed(&[b"b", b"2"]));
        let mut twice = Digest::default();
        twice.add(&one);
        twice.add(&one);
        let mut both = Digest::default();
        both.add(&one);
        both.add(&two);
        assert_ne!(twice.to_bytes(), both.to_bytes());
    }
}
