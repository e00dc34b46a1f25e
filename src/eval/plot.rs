//! Charts, drawn with plotters' SVG backend: win/tie/loss per task, and training curves.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::winrate::Summary;

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the chart: {e}")
}

/// Horizontal stacked bars: the share of wins, ties and losses for each task and overall.
pub fn win_tie_loss(s: &Summary, path: &Path) -> Result<()> {
    let mut rows: Vec<(String, [usize; 3])> =
        s.per_task.iter().map(|(t, b)| (t.clone(), [b.rate.wins, b.rate.ties, b.rate.losses])).collect();
    rows.push(("overall".into(), [s.overall.rate.wins, s.overall.rate.ties, s.overall.rate.losses]));
    let height = 90 + 40 * rows.len() as u32;
    let root = SVGBackend::new(path, (720, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!("{} vs {} — judge {}", short(&s.model), short(&s.baseline), s.judge);
    // Task names sit left of the bars, inside the plotting area (x < 0).
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(8)
        .build_cartesian_2d(-45f64..100f64, 0f64..rows.len() as f64)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("% of comparisons")
        .x_label_formatter(&|x| {
            if *x < 0.0 {
                String::new()
            } else {
                format!("{x:.0}")
            }
        })
        .y_label_formatter(&|_| String::new())
        .draw()
        .map_err(plot_err)?;
    let label_font = ("sans-serif", 14).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Left,
        plotters::style::text_anchor::VPos::Center,
    ));
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (name, counts))| {
            let total = counts.iter().sum::<usize>().max(1) as f64;
            let rate = (counts[0] as f64 + counts[1] as f64 / 2.0) / total * 100.0;
            Text::new(format!("{name} ({rate:.0}%)"), (-44.0, i as f64 + 0.5), label_font.clone())
        }))
        .map_err(plot_err)?;
    let colours = [RGBColor(46, 139, 87), RGBColor(170, 170, 170), RGBColor(200, 60, 60)];
    for (k, (label, colour)) in ["wins", "ties", "losses"].iter().zip(colours).enumerate() {
        let bars = rows.iter().enumerate().map(|(i, (_, counts))| {
            let total = counts.iter().sum::<usize>().max(1) as f64;
            let start = counts[..k].iter().sum::<usize>() as f64 / total * 100.0;
            let end = start + counts[k] as f64 / total * 100.0;
            Rectangle::new([(start, i as f64 + 0.2), (end, i as f64 + 0.8)], colour.filled())
        });
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The last path component of a model name, for titles.
fn short(name: &str) -> &str {
    name.trim_end_matches('/').rsplit('/').next().unwrap_or(name)
}

/// One panel of training curves: a metric and its `eval_` twin over steps.
pub struct Panel {
    /// The metric's name.
    pub metric: String,
    /// `(step, value)` of the training metric.
    pub train: Vec<(f64, f64)>,
    /// `(step, value)` of `eval_<metric>`.
    pub eval: Vec<(f64, f64)>,
}

/// Panels stacked vertically, training in blue and held-out in orange.
pub fn training_curves(panels: &[Panel], title: &str, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (760, 40 + 260 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(plot_err)?;
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let points = panel.train.iter().chain(&panel.eval);
        let (x_max, (y_min, y_max)) = points
            .fold((1f64, (f64::INFINITY, f64::NEG_INFINITY)), |(x, (lo, hi)), &(s, v)| {
                (x.max(s), (lo.min(v), hi.max(v)))
            });
        let pad = ((y_max - y_min) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.metric, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc("step").draw().map_err(plot_err)?;
        for (series, colour, label) in
            [(&panel.train, BLUE, "train"), (&panel.eval, RGBColor(230, 120, 20), "held-out")]
        {
            if series.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(series.iter().copied(), colour.stroke_width(2)))
                .map_err(plot_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2)));
            chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(plot_err)?;
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
