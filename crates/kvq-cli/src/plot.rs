//! Log-log line charts written as SVG (plotters), for the tour's figures.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A chart with logarithmic x and y axes; each series is a line with markers.
pub fn loglog(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0 > 0.0 && p.1 > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(anyhow!("nothing to plot in {title}"));
    }
    let root = SVGBackend::new(path, (860, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(72)
        // Less than a decade wide (bits 2..8), a base-10 axis would have no tick at all.
        .build_cartesian_2d((x0 / 1.2..x1 * 1.2).log_scale().base(if x1 / x0 < 10.0 { 2.0 } else { 10.0 }), (y0 / 1.5..y1 * 1.5).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(12)
        .y_labels(12)
        .x_desc(x_label)
        .y_desc(y_label)
        .y_label_formatter(&|y| format_num(*y))
        .x_label_formatter(&|x| format_num(*x))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0 > 0.0 && p.1 > 0.0).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(if rising(series) { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::UpperRight })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Whether the data mostly go up from left to right (then the legend goes upper left).
fn rising(series: &[Series]) -> bool {
    let slope: f64 = series.iter().filter(|s| s.points.len() > 1).map(|s| s.points.last().unwrap().1.ln() - s.points[0].1.ln()).sum();
    slope >= 0.0
}

fn format_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.3}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.3}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.3}k", x / 1e3)
    } else if a >= 1.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.1e}")
    }
    .replace(".000", "")
}
