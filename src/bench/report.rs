//! Latency summaries, text tables, and SVG latency CDFs.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::Path;

/// A histogram of microseconds from 1 µs to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.5),
            p90_us: histogram.value_at_quantile(0.9),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// `numerator / denominator`, or NaN-free 0 when there is nothing to divide by.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 { numerator / denominator } else { 0.0 }
}

/// A plain text table with right-aligned columns after the first.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(
                |(column, (cell, width))| {
                    if column == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") }
                },
            )
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    out.push_str(&widths.iter().map(|width| "-".repeat(*width)).collect::<Vec<_>>().join("  "));
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Writes an SVG with one latency CDF per series (log-scale latency axis).
pub fn plot_latency_cdf(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<()> {
    use plotters::prelude::*;
    let populated: Vec<&(String, &Histogram<u64>)> =
        series.iter().filter(|(_, histogram)| !histogram.is_empty()).collect();
    let low = populated.iter().map(|(_, histogram)| histogram.min()).min().unwrap_or(1).max(1) as f64;
    let high = populated.iter().map(|(_, histogram)| histogram.max()).max().unwrap_or(10).max(10) as f64;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(56)
        .build_cartesian_2d((low * 0.9..high * 1.1).log_scale(), 0.0..100.0)?;
    chart.configure_mesh().x_desc("latency (µs, log scale)").y_desc("percent of operations at or below").draw()?;
    for (index, (name, histogram)) in populated.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let total = histogram.len() as f64;
        let mut seen = 0u64;
        let points: Vec<(f64, f64)> = histogram
            .iter_recorded()
            .map(|value| {
                seen += value.count_at_value();
                (value.value_iterated_to() as f64, 100.0 * seen as f64 / total)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_percentiles_and_empty_is_zero() {
        let mut histogram = new_histogram();
        for value in 1..=1000 {
            histogram.record(value).expect("in range");
        }
        let summary = LatencySummary::of(&histogram);
        assert_eq!((summary.count, summary.p50_us, summary.max_us), (1000, 500, 1000));
        assert!((989..=991).contains(&summary.p99_us));
        assert_eq!(LatencySummary::of(&new_histogram()), LatencySummary::default());
    }

    #[test]
    fn table_aligns_columns() {
        let table = render_table(&["run", "p50"], &[vec!["a".into(), "5".into()], vec!["longer".into(), "100".into()]]);
        assert_eq!(table, "run     p50\n------  ---\na         5\nlonger  100");
    }

    #[test]
    fn cdf_plot_is_written() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("cdf.svg");
        let mut histogram = new_histogram();
        for value in [10, 20, 30, 400] {
            histogram.record(value).expect("in range");
        }
        plot_latency_cdf(&path, "test", &[("run".into(), &histogram)]).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "an SVG with a line");
    }
}
