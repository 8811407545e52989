//! The digest both key/value guests keep of their state: the number of pairs and the
//! wrapping sum of each pair's 128-bit hash. Summing (rather than chaining) makes it O(1)
//! to update and equal for equal contents whatever history produced them. How a pair is
//! hashed is each guest's own (a string key in kvstore, a slot number in diskstorage).

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    count: u64,
    sum: u128,
}

impl Digest {
    pub const LEN: usize = 24;

    /// A pair with this hash joined the state.
    pub fn add(&mut self, hash: u128) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(hash);
    }

    /// A pair with this hash left the state (it must have been added).
    pub fn remove(&mut self, hash: u128) {
        self.count -= 1;
        self.sum = self.sum.wrapping_sub(hash);
    }

    pub fn count(self) -> u64 {
        self.count
    }

    /// Count LE (8 bytes) then sum LE (16 bytes).
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut bytes = [0; Self::LEN];
        bytes[..8].copy_from_slice(&self.count.to_le_bytes());
        bytes[8..].copy_from_slice(&self.sum.to_le_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_removal_undoes() {
        let mut a = Digest::default();
        a.add(1);
        a.add(u128::MAX);
        let mut b = Digest::default();
        b.add(u128::MAX);
        b.add(7);
        b.add(1);
        b.remove(7);
        assert_eq!(a, b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.to_bytes()[..8], 2u64.to_le_bytes());
        assert_ne!(a, Digest::default());
    }
}
