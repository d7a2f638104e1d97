//! The virtio-net header (`struct virtio_net_hdr_v1`) in front of every TAP frame.

/// Size of the header on every vswitch port (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` on is partial and must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// The decoded header. All multi-byte fields are little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `frame`; `None` if the frame is shorter than the header.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let h = frame.first_chunk::<VNET_HDR_LEN>()?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Some(Self {
            flags: h[0],
            gso_type: h[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out` (`num_buffers` = 0).
    /// Returns `None` if `out` is too short.
    pub fn write(&self, out: &mut [u8]) -> Option<()> {
        let h = out.first_chunk_mut::<VNET_HDR_LEN>()?;
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        h[10..12].copy_from_slice(&0u16.to_le_bytes());
        Some(())
    }

    /// Whether the frame is a GSO super-frame that a receiver must segment.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut buf = [0xffu8; VNET_HDR_LEN];
        h.write(&mut buf).expect("fits");
        assert_eq!(VnetHdr::parse(&buf), Some(h));
        assert!(h.is_gso());
        assert_eq!(VnetHdr::parse(&buf[..11]), None);
    }
}
