"""Shared pieces of the lesson notebooks: the first cells, and writing a notebook."""
import nbformat

SETUP = """:cache 4000
:build_env CARGO_PROFILE_DEV_DEBUG_ASSERTIONS=false
:build_env CARGO_PROFILE_DEV_OVERFLOW_CHECKS=false
:dep kvq = { path = "../crates/kvq" }
:dep candle-core = "0.11.1"
:dep plotters = { version = "0.3", default-features = false, features = ["evcxr", "all_series", "all_elements"] }"""

HELPERS = r'''// Helpers for the cells below: an inline figure, a log-log line chart, a text table.
use plotters::prelude::*;

/// An SVG drawn with plotters, shown inline as an image (`image/svg+xml`).
pub struct Figure(pub String);

impl Figure {
    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT image/svg+xml\n{}\nEVCXR_END_CONTENT", self.0);
    }
}

/// Draws on a `w × h` SVG canvas, like `plotters::evcxr::evcxr_figure`, but returns the
/// picture as an image output (which GitHub's notebook viewer shows).
pub fn figure(w: u32, h: u32, draw: impl FnOnce(DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<(), Box<dyn std::error::Error>>) -> Figure {
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area()).expect("drawing failed");
    Figure(svg)
}

pub const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40),
    RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127),
];

pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1e5 {
        let (v, unit) = if a >= 1e9 { (x / 1e9, "G") } else if a >= 1e6 { (x / 1e6, "M") } else { (x / 1e3, "k") };
        return format!("{}{unit}", fmt_num(v));
    }
    if a != 0.0 && a < 1e-3 {
        return format!("{x:.1e}");
    }
    // three significant digits, without trailing zeros
    let decimals = if a >= 100.0 { 0 } else if a >= 10.0 { 1 } else if a >= 1.0 { 2 } else { (2.0 - a.log10().floor()) as usize };
    let s = format!("{x:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Round tick values between lo and hi for a logarithmic axis.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[f64] = if hi / lo > 1e4 { &[1.0] } else if hi / lo > 20.0 { &[1.0, 2.0, 5.0] } else { &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0] };
    let mut t = Vec::new();
    for e in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
        for s in steps {
            let v = s * 10f64.powi(e);
            if v >= lo && v <= hi {
                t.push(v);
            }
        }
    }
    t
}

/// Lines with markers on logarithmic axes, with the legend beside the chart;
/// a series named "guide: …" is drawn as a dashed grey reference line.
pub fn loglog(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Figure {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|s| s.1.iter()).filter(|p| p.0 > 0.0 && p.1 > 0.0) {
        x0 = x0.min(x); x1 = x1.max(x); y0 = y0.min(y); y1 = y1.max(y);
    }
    let grey = RGBColor(150, 150, 150);
    figure(900, 460, |root| {
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 19))?;
        let (left, right) = root.split_horizontally(640);
        let mut chart = ChartBuilder::on(&left)
            .margin(10).x_label_area_size(44).y_label_area_size(70)
            .build_cartesian_2d(
                (x0 / 1.15..x1 * 1.15).log_scale().with_key_points(log_ticks(x0 / 1.15, x1 * 1.15)),
                (y0 / 1.5..y1 * 1.5).log_scale().with_key_points(log_ticks(y0 / 1.5, y1 * 1.5)),
            )?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label)
            .x_label_formatter(&|x| fmt_num(*x)).y_label_formatter(&|y| fmt_num(*y)).draw()?;
        let mut legend_y = 30;
        for (i, (name, pts)) in series.iter().enumerate() {
            let mut pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 > 0.0 && p.1 > 0.0).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (label, color) = match name.strip_prefix("guide: ") {
                Some(label) => {
                    chart.draw_series(DashedLineSeries::new(pts, 6, 4, grey.stroke_width(1)))?;
                    (label, grey)
                }
                None => {
                    let c = COLORS[i % COLORS.len()];
                    chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
                    chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
                    (name.as_str(), c)
                }
            };
            // Legend entry: a short line, then the label wrapped at ~30 characters.
            right.draw(&PathElement::new(vec![(8, legend_y + 8), (30, legend_y + 8)], color.stroke_width(2)))?;
            let mut line = String::new();
            for word in label.split(' ') {
                if !line.is_empty() && line.chars().count() + word.chars().count() > 30 {
                    right.draw(&Text::new(line.clone(), (38, legend_y), ("sans-serif", 13)))?;
                    legend_y += 16;
                    line.clear();
                }
                if !line.is_empty() { line.push(' '); }
                line.push_str(word);
            }
            right.draw(&Text::new(line, (38, legend_y), ("sans-serif", 13)))?;
            legend_y += 24;
        }
        root.present()?;
        Ok(())
    })
}

/// A right-aligned text table.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| cells.iter().enumerate().map(|(i, c)| format!("{:>1$}", c, w[i])).collect::<Vec<_>>().join("  ");
    let mut out = line(head.to_vec()) + "\n" + &w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>().join("  ") + "\n";
    for r in rows {
        out += &(line(r.iter().map(|s| s.as_str()).collect()) + "\n");
    }
    out
}'''


def md(text):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text):
    return nbformat.v4.new_code_cell(text.strip("\n"))


def notebook(cells, path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Rust", "language": "rust", "name": "rust"},
        "language_info": {"codemirror_mode": "rust", "file_extension": ".rs", "mimetype": "text/rust",
                          "name": "Rust", "pygment_lexer": "rust", "version": ""},
    }
    nb.cells = cells
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating a notebook changes no more than its content
    nbformat.validate(nb)
    nbformat.write(nb, path)


def footer(quiz, exercises, nxt=None):
    ex = "\n".join(f"    cargo test -p kvq-exercises --test {e}" for e in exercises)
    s = f"""## Check yourself

- Quiz: [`quizzes/{quiz}`](quizzes/{quiz}) (mdbook-quiz format; the answers' explanations are in the file).
- Exercise: complete the stub in `crates/kvq-exercises/src/` until its test passes (from the repository root):

{ex}
"""
    if nxt:
        s += f"\nNext: [{nxt[0]}]({nxt[1]})."
    return md(s)

# The measured quality report (bench/results/quality.md, written by bench/quality.sh), read by
# lessons 4-6: one parser for all three.
QUALITY = r"""// bench/results/quality.md: every cache, kvq's and the peers', at 1k, 4k and 8k tokens of two
// documents. One row of its tables:
#[derive(Debug, Clone)]
pub struct QualityRow { pub tool: String, pub cache: String, pub bits: f64, pub ppl: f64, pub dppl: f64, pub kl: f64 }

/// The rows of the report's table for one context length.
pub fn quality_rows(context: usize) -> Vec<QualityRow> {
    let report = std::fs::read_to_string("../bench/results/quality.md").expect("bench/results/quality.md");
    let heading = format!("### Context {context}");
    let table = report.split(&heading).nth(1).expect("no table for that context");
    table.lines().skip_while(|l| !l.starts_with("| tool")).skip(2).take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c: Vec<&str> = l.split('|').map(str::trim).collect();
            let num = |i: usize| c[i].trim_start_matches('+').parse::<f64>().unwrap_or(f64::NAN);
            QualityRow { tool: c[1].into(), cache: c[2].trim_matches('`').into(), bits: num(3), ppl: num(5), dppl: num(6), kl: num(9) }
        })
        .collect()
}

/// One row by tool and cache name (as the report's `cache` column spells it).
pub fn quality_row(rows: &[QualityRow], tool: &str, cache: &str) -> QualityRow {
    rows.iter().find(|r| r.tool == tool && r.cache == cache).cloned().unwrap_or_else(|| panic!("no row {tool} {cache}"))
}

pub fn print_quality(rows: &[QualityRow]) {
    println!("{:<12} {:<34} {:>9} {:>9} {:>10} {:>8}", "tool", "cache", "bits/elem", "PPL", "ΔPPL %", "KL");
    for r in rows {
        println!("{:<12} {:<34} {:>9.2} {:>9.3} {:>+10.2} {:>8.4}", r.tool, r.cache, r.bits, r.ppl, r.dppl, r.kl);
    }
}
"""
