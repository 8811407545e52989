//! The digest both key/value guests keep of their state: the number of pairs and a
//! lattice hash of the set of pairs (LtHash: 1024 lanes of 16 bits, each pair's
//! contribution drawn from BLAKE3's extendable output and added lane by lane, wrapping).
//! Adding (rather than chaining) makes it O(1) to update and equal for equal contents
//! whatever history produced them; a cryptographic hash under a 16,384-bit sum makes it
//! infeasible to craft two different sets of pairs with the same digest, which a sum of
//! 128-bit non-cryptographic hashes was not (a generalised-birthday search finds a
//! colliding set of pairs quickly). How a pair is encoded is each guest's own (a string
//! key in kvstore, a slot number in diskstorage); [`pair_seed`] hashes the encoding.

/// Lanes of the lattice hash.
const LANES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    count: u64,
    lanes: [u16; LANES],
}

impl Default for Digest {
    fn default() -> Self {
        Digest { count: 0, lanes: [0; LANES] }
    }
}

/// A pair's 256-bit hash: what [`Digest::add`] expands into lanes. Each part is written
/// whole after its length, so no two pairs of parts give the same input.
pub fn pair_seed(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// The pair's vector of lanes: BLAKE3 in extendable-output mode, keyed by its seed.
fn expand(seed: &[u8; 32]) -> [u16; LANES] {
    let mut bytes = [0u8; LANES * 2];
    blake3::Hasher::new_keyed(seed).finalize_xof().fill(&mut bytes);
    let mut lanes = [0u16; LANES];
    for (lane, pair) in lanes.iter_mut().zip(bytes.chunks_exact(2)) {
        *lane = u16::from_le_bytes([pair[0], pair[1]]);
    }
    lanes
}

impl Digest {
    /// Count (8 bytes) then the BLAKE3 hash of the lanes (32 bytes).
    pub const LEN: usize = 40;

    /// A pair with this seed joined the state.
    pub fn add(&mut self, seed: &[u8; 32]) {
        self.count += 1;
        for (lane, v) in self.lanes.iter_mut().zip(expand(seed)) {
            *lane = lane.wrapping_add(v);
        }
    }

    /// A pair with this seed left the state (it must have been added).
    pub fn remove(&mut self, seed: &[u8; 32]) {
        self.count -= 1;
        for (lane, v) in self.lanes.iter_mut().zip(expand(seed)) {
            *lane = lane.wrapping_sub(v);
        }
    }

    /// A pair changed: the one with seed `old` left, the one with seed `new` joined.
    pub fn replace(&mut self, old: &[u8; 32], new: &[u8; 32]) {
        for ((lane, o), n) in self.lanes.iter_mut().zip(expand(old)).zip(expand(new)) {
            *lane = lane.wrapping_sub(o).wrapping_add(n);
        }
    }

    pub fn count(self) -> u64 {
        self.count
    }

    /// Count LE (8 bytes), then BLAKE3 of the lanes, each LE (32 bytes): the lanes are
    /// compressed only here, so an update costs no hash of the whole vector.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut lanes = [0u8; LANES * 2];
        for (out, lane) in lanes.chunks_exact_mut(2).zip(self.lanes) {
            out.copy_from_slice(&lane.to_le_bytes());
        }
        let mut bytes = [0; Self::LEN];
        bytes[..8].copy_from_slice(&self.count.to_le_bytes());
        bytes[8..].copy_from_slice(blake3::hash(&lanes).as_bytes());
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
