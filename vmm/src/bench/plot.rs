//! `--plot FILE.svg`: one panel per suite and case, a bar per runtime at
//! its median with an error bar from min to max, drawn with `plotters`'
//! SVG backend (no fonts needed: SVG text is laid out by the viewer).

use std::path::Path;

use plotters::prelude::*;

use super::{BenchError, Report};

const PANEL: (u32, u32) = (420, 320);
const COLORS: [RGBColor; 3] = [
    RGBColor(76, 114, 176),
    RGBColor(221, 132, 82),
    RGBColor(85, 168, 104),
];

/// Draws `report` into the SVG file `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), BenchError> {
    let err = |e: &dyn std::fmt::Display| {
        BenchError::Setup(format!("cannot draw {}: {e}", path.display()))
    };
    let panels = report.results.len().max(1) as u32;
    let cols = panels.min(3);
    let rows = panels.div_ceil(cols);
    let root = SVGBackend::new(path, (PANEL.0 * cols, PANEL.1 * rows + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = if report.host.nested_emulation {
        format!(
            "ligera bench: {} ({} runs; nested KVM: VM figures not representative)",
            report.settings.image, report.settings.runs
        )
    } else {
        format!(
            "ligera bench: {} ({} runs)",
            report.settings.image, report.settings.runs
        )
    };
    let (top, body) = root.split_vertically(40);
    top.titled(&title, ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let areas = body.split_evenly((rows as usize, cols as usize));
    for (case, area) in report.results.iter().zip(areas.iter()) {
        let top_value = case
            .runtimes
            .iter()
            .filter_map(|f| f.max)
            .fold(0.0f64, f64::max);
        let y_max = if top_value > 0.0 {
            top_value * 1.15
        } else {
            1.0
        };
        let n = case.runtimes.len().max(1);
        let names: Vec<&str> = case.runtimes.iter().map(|f| f.runtime).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{} / {} ({}, {} is better)",
                    case.suite, case.case, case.unit, case.better
                ),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    names.get(i as usize).copied().unwrap_or("").to_string()
                } else {
                    String::new()
                }
            })
            .y_desc(case.unit)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, f) in case.runtimes.iter().enumerate() {
            let x = i as f64;
            let color = COLORS[i % COLORS.len()];
            // One labelled element per runtime, skipped ones included.
            let label = match (f.median, &f.skipped) {
                (Some(m), _) => format!("{}: {}", f.runtime, super::num(m)),
                (None, _) => format!("{}: skipped", f.runtime),
            };
            let label_y = f.median.unwrap_or(0.0);
            if let (Some(m), Some(lo), Some(hi)) = (f.median, f.min, f.max) {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x - 0.3, 0.0), (x + 0.3, m)],
                        color.filled(),
                    )))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(std::iter::once(ErrorBar::new_vertical(
                        x,
                        lo,
                        m,
                        hi,
                        BLACK.stroke_width(1),
                        10,
                    )))
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (x - 0.3, (label_y + y_max * 0.04).min(y_max * 0.97)),
                    ("sans-serif", 12),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))
}
