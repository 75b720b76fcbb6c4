//! One colour and one marker per method, fixed by the method's name, so a method looks the same
//! in every plot of every report, whatever other methods a suite ran.

use plotters::element::{Drawable, PointCollection};
use plotters::prelude::{Color, DrawingBackend, RGBColor, ShapeStyle};
use plotters_backend::{BackendCoord, DrawingErrorKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marker {
    Circle,
    Square,
    TriangleUp,
    TriangleDown,
    Diamond,
    Cross,
    Plus,
    Pentagon,
    /// Unfilled square: the head-only floor, which sits off the parameter axis.
    HollowSquare,
    /// Unfilled circle: a method trained from random initialisation, in the method's colour.
    HollowCircle,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MethodStyle {
    pub color: RGBColor,
    pub marker: Marker,
}

/// Tableau-10 colours.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const MARKERS: [Marker; 8] = [
    Marker::Circle,
    Marker::Square,
    Marker::TriangleUp,
    Marker::TriangleDown,
    Marker::Diamond,
    Marker::Cross,
    Marker::Plus,
    Marker::Pentagon,
];

/// The methods the project ships, each with its own colour and marker.
const KNOWN: [(&str, usize, Marker); 17] = [
    ("lora", 0, Marker::Circle),
    ("adalora", 1, Marker::Square),
    ("adapter", 2, Marker::TriangleUp),
    ("prefix_tuning", 3, Marker::TriangleDown),
    ("prompt_tuning", 4, Marker::Diamond),
    ("p_tuning", 5, Marker::Cross),
    ("p_tuning_v2", 6, Marker::Plus),
    ("full_finetune", 7, Marker::Pentagon),
    ("head_only", 7, Marker::HollowSquare),
    // The LoRA family keeps LoRA's blue or its neighbours, each with its own marker.
    ("lora_plus", 0, Marker::Square),
    ("dora", 0, Marker::TriangleUp),
    ("vera", 9, Marker::Circle),
    ("loha", 9, Marker::Square),
    ("lokr", 9, Marker::TriangleUp),
    ("ia3", 8, Marker::Circle),
    ("ln_tuning", 8, Marker::Square),
    ("bitfit", 8, Marker::TriangleUp),
];

/// A method's style: the table's for a shipped method, its method's colour unfilled for a
/// random-initialisation control, otherwise one derived from a hash of the name (stable across
/// runs and reports, though two unknown names may share it).
pub(crate) fn method_style(method: &str) -> MethodStyle {
    if let Some(base) = method.strip_suffix(crate::markdown::RANDOM_INIT_SUFFIX) {
        return MethodStyle {
            color: method_style(base).color,
            marker: Marker::HollowCircle,
        };
    }
    if let Some((_, c, m)) = KNOWN.iter().find(|(name, _, _)| *name == method) {
        return MethodStyle {
            color: PALETTE[*c],
            marker: *m,
        };
    }
    // FNV-1a: a fixed hash, unlike std's randomly keyed one.
    let h = method.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    MethodStyle {
        color: PALETTE[(h % PALETTE.len() as u64) as usize],
        marker: MARKERS[((h / PALETTE.len() as u64) % MARKERS.len() as u64) as usize],
    }
}

/// A method's marker at one point, drawn in pixels so its size does not depend on the axes.
pub(crate) struct MarkerElement<C> {
    at: C,
    style: MethodStyle,
    size: i32,
}

/// The marker centred on `at`, `size` pixels from centre to edge.
pub(crate) fn marker_at<C>(style: MethodStyle, at: C, size: i32) -> MarkerElement<C> {
    MarkerElement { at, style, size }
}

impl<'a, C> PointCollection<'a, C> for &'a MarkerElement<C> {
    type Point = &'a C;
    type IntoIter = std::iter::Once<&'a C>;
    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<C, DB: DrawingBackend> Drawable<DB> for MarkerElement<C> {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut points: I,
        backend: &mut DB,
        _: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = points.next() else {
            return Ok(());
        };
        let s = self.size;
        let fill: ShapeStyle = self.style.color.filled();
        let line: ShapeStyle = self.style.color.stroke_width(3);
        let at = |pts: &[(i32, i32)]| -> Vec<BackendCoord> {
            pts.iter().map(|(dx, dy)| (x + dx, y + dy)).collect()
        };
        match self.style.marker {
            Marker::Circle => backend.draw_circle((x, y), s as u32, &fill, true),
            Marker::HollowCircle => backend.draw_circle((x, y), s as u32, &line, false),
            Marker::Square => {
                backend.fill_polygon(at(&[(-s, -s), (s, -s), (s, s), (-s, s)]), &fill)
            }
            Marker::HollowSquare => {
                backend.draw_path(at(&[(-s, -s), (s, -s), (s, s), (-s, s), (-s, -s)]), &line)
            }
            Marker::TriangleUp => {
                backend.fill_polygon(at(&[(0, -s - 1), (s + 1, s), (-s - 1, s)]), &fill)
            }
            Marker::TriangleDown => {
                backend.fill_polygon(at(&[(0, s + 1), (s + 1, -s), (-s - 1, -s)]), &fill)
            }
            Marker::Diamond => backend.fill_polygon(
                at(&[(0, -s - 2), (s + 1, 0), (0, s + 2), (-s - 1, 0)]),
                &fill,
            ),
            Marker::Pentagon => {
                let r = f64::from(s) * 1.15;
                let pts: Vec<(i32, i32)> = (0..5)
                    .map(|k| {
                        let a = -std::f64::consts::FRAC_PI_2
                            + f64::from(k) * 2.0 * std::f64::consts::PI / 5.0;
                        ((r * a.cos()).round() as i32, (r * a.sin()).round() as i32)
                    })
                    .collect();
                backend.fill_polygon(at(&pts), &fill)
            }
            Marker::Cross => {
                backend.draw_path(at(&[(-s, -s), (s, s)]), &line)?;
                backend.draw_path(at(&[(-s, s), (s, -s)]), &line)
            }
            Marker::Plus => {
                backend.draw_path(at(&[(-s - 1, 0), (s + 1, 0)]), &line)?;
                backend.draw_path(at(&[(0, -s - 1), (0, s + 1)]), &line)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_methods_have_distinct_styles() {
        let styles: Vec<MethodStyle> = KNOWN.iter().map(|(m, _, _)| method_style(m)).collect();
        for (i, a) in styles.iter().enumerate() {
            for b in &styles[i + 1..] {
                assert!(a != b, "two shipped methods share {a:?}");
            }
        }
    }

    #[test]
    fn a_random_init_control_is_its_method_unfilled() {
        let control = method_style("lora-random-init");
        assert_eq!(control.color, method_style("lora").color);
        assert_eq!(control.marker, Marker::HollowCircle);
        for (m, _, _) in KNOWN {
            assert!(method_style(m) != control, "{m} looks like the control");
        }
    }

    #[test]
    fn unknown_methods_get_a_stable_style() {
        // Names the project does not ship.
        assert_eq!(method_style("oft"), method_style("oft"));
        assert!(MARKERS.contains(&method_style("boft").marker));
        assert!(PALETTE.contains(&method_style("boft").color));
    }
}
