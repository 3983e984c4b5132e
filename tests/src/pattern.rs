//! A verifiable byte stream: any offset of a seeded stream can be produced or checked, and a
//! mismatch says where the bytes found came from.

use std::io::{Read, Write};

fn word(seed: u64, index: u64) -> u64 {
    // splitmix64
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic stream of bytes, named by its seed; any offset can be produced or checked.
pub struct Pattern {
    seed: u64,
    pos: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { seed, pos: 0 }
    }

    /// Bytes produced or checked so far.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    fn byte_at(&self, at: u64) -> u8 {
        word(self.seed, at / 8).to_le_bytes()[(at % 8) as usize]
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && !self.pos.is_multiple_of(8) {
            buf[i] = self.byte_at(self.pos);
            i += 1;
            self.pos += 1;
        }
        let (words, rest) = buf[i..].as_chunks_mut::<8>();
        for c in words {
            *c = word(self.seed, self.pos / 8).to_le_bytes();
            self.pos += 8;
        }
        for b in rest {
            *b = self.byte_at(self.pos);
            self.pos += 1;
        }
    }

    /// Checks that `data` are the next bytes of the stream.
    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        let mut expected = vec![0; data.len()];
        let start = self.pos;
        self.fill(&mut expected);
        if expected == data {
            return Ok(());
        }
        let at = expected
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .expect("some byte differs");
        let pos = start + at as u64;
        let found = self.locate(&data[at..]).map_or_else(String::new, |src| {
            let d = src as i64 - pos as i64;
            format!("; the bytes there are the stream's bytes from {src} ({d:+})")
        });
        Err(format!(
            "stream {:#x}: byte {pos} is {:#04x}, expected {:#04x}{found}",
            self.seed, data[at], expected[at]
        ))
    }

    /// Where in the stream (within 64 MiB of the current position) `data` comes from.
    fn locate(&self, data: &[u8]) -> Option<u64> {
        if data.len() < 16 {
            return None;
        }
        let around = self.pos / 8;
        let lo = around.saturating_sub(8 << 20);
        for shift in 0..8u64 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[shift as usize..shift as usize + 8]);
            let w = u64::from_le_bytes(w);
            for idx in lo..around + (8 << 20) {
                if word(self.seed, idx) == w {
                    return (idx * 8).checked_sub(shift);
                }
            }
        }
        None
    }
}

/// Writes `total` bytes of stream `seed` to `w`.
pub fn send_pattern(w: &mut impl Write, seed: u64, total: u64) -> std::io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    while p.pos() < total {
        let n = (total - p.pos()).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
    }
    Ok(())
}

/// Reads `r` to its end, checking every byte against stream `seed`; returns the byte count.
pub fn recv_pattern(r: &mut impl Read, seed: u64) -> Result<u64, String> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(p.pos()),
            Ok(n) => p.check(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed after {} bytes: {e}", p.pos())),
        }
    }
}

/// Reads exactly `n` bytes, checking them against `p`.
pub fn recv_exact_pattern(r: &mut impl Read, p: &mut Pattern, n: u64) -> Result<(), String> {
    let mut buf = vec![0; 256 * 1024];
    let end = p.pos() + n;
    while p.pos() < end {
        let want = (end - p.pos()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("end of stream at {} of {end}", p.pos())),
            Ok(k) => p.check(&buf[..k])?,
            Err(e) => return Err(format!("read failed at {}: {e}", p.pos())),
        }
    }
    Ok(())
}
