//! Packets stored end to end in one buffer, with where each ends: a batch costs two
//! allocations, reused from batch to batch, however many packets it holds.

#[derive(Debug, Default)]
pub(crate) struct Packed {
    pub(super) data: Vec<u8>,
    ends: Vec<usize>,
}

impl Packed {
    pub fn push(&mut self, packet: &[u8]) {
        self.data.extend_from_slice(packet);
        self.seal();
    }

    /// Ends a packet written straight into `data`.
    pub fn seal(&mut self) {
        self.ends.push(self.data.len());
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }

    /// How many packets.
    pub fn count(&self) -> usize {
        self.ends.len()
    }

    /// The packets' bytes together.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, &b)| &self.data[a..b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_come_back_as_they_went_in() {
        let mut p = Packed::default();
        p.push(b"one");
        p.data.extend_from_slice(b"two!");
        p.seal();
        p.push(b"");
        let got: Vec<&[u8]> = p.iter().collect();
        assert_eq!(got, vec![&b"one"[..], b"two!", b""]);
        assert_eq!((p.count(), p.bytes()), (3, 7));
        p.clear();
        assert_eq!(p.iter().count(), 0);
    }
}
