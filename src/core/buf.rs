//! A frame in a caller-owned buffer, with headroom so encapsulation prepends in place.

/// Headroom callers should leave before a frame: room for the VXLAN header (8) and a
/// virtio_net_hdr (12), rounded up.
pub const HEADROOM: usize = 32;

/// A window `[start, end)` over a caller-owned byte buffer. Encapsulation moves `start` back
/// (writing the header into the headroom); decapsulation moves it forward. The payload bytes
/// never move.
#[derive(Debug)]
pub struct FrameBuf<'a> {
    data: &'a mut [u8],
    start: usize,
    end: usize,
}

impl<'a> FrameBuf<'a> {
    /// A frame of `len` bytes at `data[start..]`. Returns `None` if that does not fit.
    pub fn new(data: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= data.len()).then_some(FrameBuf { data, start, end })
    }

    /// The frame's bytes.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// The frame's bytes, mutably.
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Frame length.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the frame is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Offset of the frame in the buffer.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }

    /// Bytes free before the frame.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Grow the frame by `n` bytes at the front; the new bytes are returned for writing.
    /// `None` (nothing changed) if the headroom is too small.
    #[inline]
    pub fn prepend(&mut self, n: usize) -> Option<&mut [u8]> {
        let s = self.start.checked_sub(n)?;
        self.start = s;
        Some(&mut self.data[s..s + n])
    }

    /// Drop `n` bytes from the front (no copy). `false` (nothing changed) if shorter than `n`.
    #[inline]
    pub fn strip(&mut self, n: usize) -> bool {
        if n > self.len() {
            return false;
        }
        self.start += n;
        true
    }

    /// Resize the frame to `len` bytes from its start (within the buffer); `false` if it does
    /// not fit. Used to write a reply of another length in place.
    #[inline]
    pub fn set_len(&mut self, len: usize) -> bool {
        match self.start.checked_add(len) {
            Some(end) if end <= self.data.len() => {
                self.end = end;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_and_strip_move_the_window_only() {
        let mut raw = [0u8; 64];
        raw[HEADROOM..HEADROOM + 4].copy_from_slice(b"abcd");
        let mut f = FrameBuf::new(&mut raw, HEADROOM, 4).unwrap();
        f.prepend(8).unwrap().copy_from_slice(b"VXLANHDR");
        assert_eq!(f.bytes(), b"VXLANHDRabcd");
        assert!(f.strip(8));
        assert_eq!(f.bytes(), b"abcd");
        assert!(!f.strip(5));
        assert!(f.prepend(HEADROOM + 1).is_none());
        assert_eq!(f.bytes(), b"abcd");
        assert!(f.set_len(10));
        assert!(!f.set_len(64));
        assert!(FrameBuf::new(&mut [0u8; 4], 2, 3).is_none());
    }
}
