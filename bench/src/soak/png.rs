//! A minimal PNG encoder for the soak chart: 8-bit indexed colour, one IDAT, deflate with the
//! fixed Huffman code and run-length matches only (distance 1) over rows filtered "up", which
//! is enough for a chart (mostly background and rows like the one above) and needs no
//! dependency and no system library.

/// Encode `pixels` (palette indices, `width` × `height`, row by row) as a PNG file.
pub fn encode(width: u32, height: u32, palette: &[[u8; 3]], pixels: &[u8]) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), width as usize * height as usize);
    // Each row is preceded by its filter type: 2 ("up", each byte minus the one above it), so
    // a row like the one above becomes zeros and a chart compresses to long runs.
    let width = width.max(1);
    let mut raw = Vec::with_capacity(pixels.len() + height as usize);
    let mut above: &[u8] = &[];
    for row in pixels.chunks(width as usize) {
        raw.push(2);
        raw.extend(
            row.iter()
                .enumerate()
                .map(|(i, &p)| p.wrapping_sub(above.get(i).copied().unwrap_or(0))),
        );
        above = row;
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 3 (indexed), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    let plte: Vec<u8> = palette.iter().flatten().copied().collect();

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"PLTE", &plte);
    chunk(&mut out, b"IDAT", &zlib(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (ISO-HDLC, as PNG uses), bit by bit: the chart is small.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A zlib stream holding one final deflate block with the fixed Huffman code.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut w = Bits::default();
    w.out.extend_from_slice(&[0x78, 0x01]);
    w.put(1, 1); // BFINAL
    w.put(1, 2); // BTYPE 01: fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let run = if i > 0 {
            data[i..]
                .iter()
                .take(258)
                .take_while(|&&b| b == data[i - 1])
                .count()
        } else {
            0
        };
        if run >= 3 {
            w.length(run);
            w.code(0, 5); // distance code 0: distance 1, no extra bits
            i += run;
        } else {
            w.literal(u16::from(data[i]));
            i += 1;
        }
    }
    w.literal(256); // end of block
    w.flush();
    let mut out = w.out;
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// Deflate's bit writer: fields least-significant bit first, Huffman codes most-significant
/// bit first.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

/// Match lengths 3..=258: the base of each length code (257 + index) and its extra bits.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn code(&mut self, code: u32, bits: u32) {
        let reversed = code.reverse_bits() >> (32 - bits);
        self.put(reversed, bits);
    }

    /// A literal/length symbol in the fixed code (RFC 1951 §3.2.6).
    fn literal(&mut self, sym: u16) {
        let sym = u32::from(sym);
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xC0 + sym - 280, 8),
        }
    }

    fn length(&mut self, len: usize) {
        let len = len as u16;
        let idx = LENGTH_BASE.iter().rposition(|&b| b <= len).unwrap_or(0);
        self.literal(257 + idx as u16);
        let extra = LENGTH_EXTRA[idx];
        if extra > 0 {
            self.put(u32::from(len - LENGTH_BASE[idx]), extra);
        }
    }

    fn flush(&mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc = 0;
            self.n = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_reference_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    /// Fixed-Huffman inflate, enough to read back what `zlib` writes.
    fn inflate(z: &[u8]) -> Vec<u8> {
        let data = &z[2..z.len() - 4];
        let mut pos = 0usize;
        let mut bit = |n: u32| -> u32 {
            let mut v = 0;
            for i in 0..n {
                let b = (data[pos / 8] >> (pos % 8)) & 1;
                v |= u32::from(b) << i;
                pos += 1;
            }
            v
        };
        assert_eq!(bit(3), 0b011, "final fixed block");
        let mut out: Vec<u8> = Vec::new();
        loop {
            // Read a fixed-code symbol MSB first: 7 bits, then maybe 8 or 9.
            let mut code = 0u32;
            for _ in 0..7 {
                code = (code << 1) | bit(1);
            }
            let sym = if code <= 0x17 {
                code + 256
            } else {
                code = (code << 1) | bit(1);
                match code {
                    0x30..=0xBF => code - 0x30,
                    0xC0..=0xC7 => code - 0xC0 + 280,
                    _ => {
                        code = (code << 1) | bit(1);
                        code - 0x190 + 144
                    }
                }
            };
            match sym {
                0..=255 => out.push(sym as u8),
                256 => break,
                _ => {
                    let idx = (sym - 257) as usize;
                    let len = u32::from(LENGTH_BASE[idx]) + bit(LENGTH_EXTRA[idx]);
                    let mut d = 0;
                    for _ in 0..5 {
                        d = (d << 1) | bit(1);
                    }
                    assert_eq!(d, 0, "only distance 1 is written");
                    for _ in 0..len {
                        out.push(*out.last().unwrap());
                    }
                }
            }
        }
        assert_eq!(
            u32::from_be_bytes(z[z.len() - 4..].try_into().unwrap()),
            adler32(&out)
        );
        out
    }

    #[test]
    fn deflate_round_trips() {
        let mut data = vec![0u8; 1000];
        data.extend((0..=255u8).cycle().take(700));
        data.extend([7u8; 3]);
        data.extend([9u8; 300]);
        data.extend([1, 2, 1, 2]);
        assert_eq!(inflate(&zlib(&data)), data);
        assert!(zlib(&[0u8; 10_000]).len() < 200);
        assert_eq!(inflate(&zlib(&[])), Vec::<u8>::new());
    }

    #[test]
    fn png_has_its_chunks_in_order() {
        let png = encode(3, 2, &[[255, 255, 255], [0, 0, 0]], &[0, 1, 0, 1, 0, 1]);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let kinds: Vec<&[u8]> = [12usize, 37, 55]
            .iter()
            .map(|&at| &png[at..at + 4])
            .collect();
        assert_eq!(kinds, [&b"IHDR"[..], b"PLTE", b"IDAT"]);
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
    }
}
