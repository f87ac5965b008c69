//! Line charts as PNG files (plotters): a title, labelled axes and a legend, in the DejaVu Sans
//! font of Debian's `fonts-dejavu-core` (scripts/prereqs installs it).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

/// Where the font is looked for, first found wins.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Colours for successive series.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(0, 0, 0),
];

/// A line chart to draw.
pub struct Chart<'a> {
    /// Drawn above the plot.
    pub title: &'a str,
    /// What the x axis measures, with its unit.
    pub x_label: &'a str,
    /// What the y axis measures, with its unit.
    pub y_label: &'a str,
    /// The lines: a name for the legend and points (x, y).
    pub series: &'a [(String, Vec<(f64, f64)>)],
}

/// Registers the font with plotters once; the error says what is missing.
fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = FONT_PATHS.iter().find(|p| Path::new(p).exists()).ok_or_else(|| {
                format!("no DejaVu Sans font (looked in {}): install fonts-dejavu-core", FONT_PATHS.join(", "))
            })?;
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font plotters can read"))
        })
        .clone()
}

/// Draws `chart` as lines over axes starting at 0, with a legend, and writes the PNG to `path`.
pub fn line_chart(chart: &Chart, path: &Path) -> Result<(), String> {
    font()?;
    let points = chart.series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let failed = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| failed(&e))?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| failed(&e))?;
    for (i, (name, pts)) in chart.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        ctx.draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
            .map_err(|e| failed(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png() {
        let dir = std::env::temp_dir().join(format!("trompe-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.png");
        let series = [
            ("n1".to_string(), vec![(0.0, 0.0), (10.0, 1.5), (20.0, 0.7)]),
            ("n2".to_string(), vec![(0.0, 0.2), (20.0, 0.4)]),
        ];
        let chart = Chart { title: "lag", x_label: "seconds", y_label: "lag (s)", series: &series };
        line_chart(&chart, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[bytes.len() - 8..bytes.len() - 4], b"IEND");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
