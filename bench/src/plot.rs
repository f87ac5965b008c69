//! Line charts as PNG files, without dependencies: a small raster, straight lines, a 3×5 pixel
//! font for the axis numbers, and a PNG encoder with uncompressed deflate blocks.

use std::io;
use std::path::Path;

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Colours for successive series.
pub const PALETTE: [Rgb; 6] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [0, 0, 0]];

/// A white canvas.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
}

impl Canvas {
    /// A canvas of `width` × `height` white pixels.
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, pixels: vec![[255, 255, 255]; width * height] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    /// A straight line (Bresenham), two pixels thick.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3×5 font (digits, '.', '-', 's'), `scale` pixels per font pixel, top left at
    /// (x, y).
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(x + (i as i64 * 4 + col) * scale + dx, y + r as i64 * scale + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The canvas as a PNG file.
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width) {
            raw.push(0); // filter: none
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib_stored(&raw));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

/// The 3×5 bitmap of a character (unknown characters are blank).
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        '-' => [0, 0, 0b111, 0, 0],
        's' => [0, 0b011, 0b100, 0b001, 0b110],
        _ => [0; 5],
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A zlib stream of uncompressed deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65_535).collect() };
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// Draws `series` (name, points (x, y)) as lines over shared axes starting at 0 and writes the
/// PNG to `path`. The axes carry their maxima (x in seconds); the legend is the colour order of
/// `PALETTE`, printed by the caller.
pub fn line_chart(series: &[(String, Vec<(f64, f64)>)], path: &Path) -> io::Result<()> {
    let (w, h, left, bottom, top, right) = (900i64, 420i64, 60i64, 40i64, 20i64, 20i64);
    let mut canvas = Canvas::new(w as usize, h as usize);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = nice_ceiling(points.map(|p| p.1).fold(0.1, f64::max));
    let to_px = |(x, y): (f64, f64)| {
        let px = left + ((x / x_max) * (w - left - right) as f64) as i64;
        let py = h - bottom - ((y / y_max) * (h - bottom - top) as f64) as i64;
        (px, py)
    };
    let grey = [200, 200, 200];
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        let (_, py) = to_px((0.0, y));
        canvas.line((left, py), (w - right, py), grey);
        let label = if y_max < 1.0 {
            format!("{y:.2}s")
        } else if y_max < 10.0 {
            format!("{y:.1}s")
        } else {
            format!("{y:.0}s")
        };
        canvas.text(4, py - 5, &label, 2, [0, 0, 0]);
    }
    canvas.line((left, h - bottom), (w - right, h - bottom), [0, 0, 0]);
    canvas.line((left, top), (left, h - bottom), [0, 0, 0]);
    canvas.text(left, h - bottom + 10, "0", 2, [0, 0, 0]);
    canvas.text(w - right - 50, h - bottom + 10, &format!("{x_max:.0}s"), 2, [0, 0, 0]);
    for (i, (_, pts)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for pair in pts.windows(2) {
            canvas.line(to_px(pair[0]), to_px(pair[1]), colour);
        }
    }
    std::fs::write(path, canvas.png())
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v).unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let z = zlib_stored(b"Wikipedia");
        assert_eq!(&z[z.len() - 4..], &0x11E6_0398u32.to_be_bytes());
    }

    #[test]
    fn a_chart_is_a_png() {
        let dir = std::env::temp_dir().join(format!("trompe-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.png");
        line_chart(&[("a".into(), vec![(0.0, 0.0), (10.0, 1.5), (20.0, 0.7)])], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[bytes.len() - 8..bytes.len() - 4], b"IEND");
        assert!(bytes.len() > 900 * 420 * 3);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(nice_ceiling(0.13), 0.2);
        assert_eq!(nice_ceiling(7.0), 10.0);
    }
}
