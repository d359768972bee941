//! PNG charts of a `compare` run, drawn with plotters. Text is rendered
//! from a font embedded in the binary (DejaVu Sans, see
//! bench/fonts/DejaVuSans-LICENSE.txt), so no fontconfig or system font is
//! needed.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the embedded font once.
fn font() -> anyhow::Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()
            && plotters::style::register_font(FAMILY, FontStyle::Bold, FONT).is_ok()
    });
    anyhow::ensure!(ok, "the embedded font could not be loaded");
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

/// The colours of the systems, the same in every chart.
pub fn system_color(system: &str) -> RGBColor {
    if system.starts_with("direct") {
        RGBColor(90, 90, 90)
    } else if system.starts_with("PgBouncer") {
        RGBColor(230, 140, 30)
    } else if system.starts_with("Pgpool") {
        RGBColor(200, 50, 50)
    } else if system.contains("no proxy") {
        RGBColor(150, 150, 150)
    } else if system.contains("1 node") {
        RGBColor(120, 170, 230)
    } else if system.contains("2 nodes") {
        RGBColor(60, 120, 200)
    } else {
        RGBColor(20, 70, 160)
    }
}

/// One bar: its label, value, colour and the text printed at its end.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub color: RGBColor,
    pub text: String,
}

/// A horizontal bar chart, one labelled bar per row; `mark` draws a
/// vertical reference line (e.g. 1.0 = direct).
pub fn bars(
    path: &Path,
    title: &str,
    x_desc: &str,
    rows: &[Bar],
    mark: Option<f64>,
) -> anyhow::Result<()> {
    font()?;
    let n = rows.len() as i32;
    let height = 140 + 34 * rows.len() as u32;
    let root = BitMapBackend::new(path, (1250, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = rows
        .iter()
        .map(|r| r.value)
        .chain(mark)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 21))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(370)
        .build_cartesian_2d(0.0..max * 1.18, (0..n).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(x_desc)
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 16))
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            // Row 0 at the top.
            SegmentValue::CenterOf(i) => rows
                .get((n - 1 - *i) as usize)
                .map(|r| r.label.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(err)?;
    if let Some(m) = mark {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(m, SegmentValue::Exact(0)), (m, SegmentValue::Exact(n))],
                BLACK.mix(0.6).stroke_width(2),
            )))
            .map_err(err)?;
    }
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = n - 1 - i as i32;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (r.value, SegmentValue::Exact(y + 1)),
                ],
                r.color.filled(),
            );
            bar.set_margin(5, 5, 0, 0);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = n - 1 - i as i32;
            Text::new(
                format!(" {}", r.text),
                (r.value, SegmentValue::CenterOf(y)),
                TextStyle::from((FAMILY, 16).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One subscriber's lag over the run: (seconds, entries, ms).
pub struct LagSeries {
    pub node: String,
    pub points: Vec<(f64, f64, f64)>,
}

/// Subscriber lag during the write run: entries behind (top) and
/// milliseconds behind (bottom).
pub fn lag(path: &Path, title: &str, series: &[LagSeries]) -> anyhow::Result<()> {
    font()?;
    let root = BitMapBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, (FAMILY, 21)).map_err(err)?;
    let panels = root.split_evenly((2, 1));
    let colors = [
        RGBColor(20, 70, 160),
        RGBColor(200, 50, 50),
        RGBColor(40, 150, 60),
    ];
    let t_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    for (panel, (desc, pick)) in panels.iter().zip([
        ("lag (log entries behind the head)", 0usize),
        ("lag (ms behind the head)", 1usize),
    ]) {
        let value = |p: &(f64, f64, f64)| if pick == 0 { p.1 } else { p.2 };
        let y_max = series
            .iter()
            .flat_map(|s| s.points.iter().map(value))
            .fold(1.0_f64, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start of the write run")
            .y_desc(desc)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .axis_desc_style((FAMILY, 17))
            .label_style((FAMILY, 15))
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.0, value(p))),
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label(s.node.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 16))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One writing connection around the kill: acknowledged writes and
/// errors, in ms relative to the kill.
pub struct ClientTimeline {
    pub oks: Vec<f64>,
    pub errors: Vec<f64>,
}

/// Per-client write successes and failures around the kill of the
/// primary; `first_write_ms` marks when writes resumed.
pub fn failover(
    path: &Path,
    title: &str,
    clients: &[ClientTimeline],
    from_ms: f64,
    to_ms: f64,
    first_write_ms: f64,
) -> anyhow::Result<()> {
    font()?;
    let n = clients.len().max(1);
    let root = BitMapBackend::new(path, (1100, 200 + 70 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 21))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(110)
        .build_cartesian_2d(from_ms..to_ms, -0.5..(n as f64 - 0.5))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("ms relative to the moment every process of the killed primary is gone (SIGKILL sent just before)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .axis_desc_style((FAMILY, 17))
        .label_style((FAMILY, 15))
        .y_labels(n)
        .y_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 {
                format!("client {}", i as usize + 1)
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    let green = RGBColor(40, 150, 60);
    let red = RGBColor(210, 30, 30);
    for (i, c) in clients.iter().enumerate() {
        let y = i as f64;
        chart
            .draw_series(
                c.oks
                    .iter()
                    .filter(|t| **t >= from_ms && **t <= to_ms)
                    .map(|t| {
                        Rectangle::new([(*t, y - 0.25), (*t + 0.6, y + 0.25)], green.filled())
                    }),
            )
            .map_err(err)?;
        chart
            .draw_series(
                c.errors
                    .iter()
                    .filter(|t| **t >= from_ms && **t <= to_ms)
                    .map(|t| Cross::new((*t, y), 9, red.stroke_width(3))),
            )
            .map_err(err)?;
    }
    let top = n as f64 - 0.5;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, -0.5), (0.0, top)],
            BLACK.stroke_width(2),
        )))
        .map_err(err)?
        .label("primary killed")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.stroke_width(3)));
    let blue = RGBColor(20, 70, 200);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(first_write_ms, -0.5), (first_write_ms, top)],
            blue.stroke_width(2),
        )))
        .map_err(err)?
        .label(format!("first write acknowledged ({first_write_ms:.0} ms)"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue.stroke_width(3)));
    chart
        .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
        .map_err(err)?
        .label("write acknowledged")
        .legend(move |(x, y)| Rectangle::new([(x + 8, y - 6), (x + 12, y + 6)], green.filled()));
    chart
        .draw_series(std::iter::empty::<Cross<(f64, f64), i32>>())
        .map_err(err)?
        .label("write failed (error returned)")
        .legend(move |(x, y)| Cross::new((x + 10, y), 6, red.stroke_width(3)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
