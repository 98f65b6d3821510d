//! Base processing (method.md §1): decoded samples to a 3-channel float image in [0, 1].

use super::{Decoded, Image};

/// `5000 / 65536`, added to `CH3 - CH2` to form the third SRH channel (exact in f32).
const SRH_SUBTRACTED_BASE: f32 = 5000.0 / 65536.0;

/// The float image the augmentations and the model see.
///
/// - SRH (CH2, CH3): each divided by 65536, a third channel `CH3 - CH2 + 5000/65536`,
///   channel order (third, CH2, CH3), clamped to [0, 1]. Every step is exact in f32,
///   so this equals the reference (`Normalize((0, 0), (65536, 65536))`,
///   `GetThirdChannel`, `MinMaxChop`) bit for bit.
/// - 8-bit RGB: `/ 255` (torchvision `convert_image_dtype`); 16-bit RGB: `/ 65535`.
/// - 8-bit gray: `/ 255`, repeated into three equal channels.
pub fn base_process(decoded: &Decoded) -> Image {
    match decoded {
        Decoded::Srh {
            height,
            width,
            ch2,
            ch3,
        } => srh(*height, *width, ch2, ch3),
        Decoded::Rgb8 {
            height,
            width,
            data,
        } => interleaved_rgb(*height, *width, data, |v| f32::from(v) / 255.0),
        Decoded::Rgb16 {
            height,
            width,
            data,
        } => interleaved_rgb(*height, *width, data, |v| f32::from(v) / 65535.0),
        Decoded::Gray8 {
            height,
            width,
            data,
        } => {
            let plane: Vec<f32> = data.iter().map(|&v| f32::from(v) / 255.0).collect();
            let mut out = Vec::with_capacity(3 * plane.len());
            for _ in 0..3 {
                out.extend_from_slice(&plane);
            }
            Image::new(3, *height, *width, out)
        }
    }
}

fn srh(height: usize, width: usize, ch2: &[u16], ch3: &[u16]) -> Image {
    let len = height * width;
    debug_assert_eq!(ch2.len(), len);
    debug_assert_eq!(ch3.len(), len);
    let mut out = Image::zeros(3, height, width);
    let (third, rest) = out.data.split_at_mut(len);
    let (out2, out3) = rest.split_at_mut(len);
    for ((((t, o2), o3), &c2), &c3) in third
        .iter_mut()
        .zip(out2.iter_mut())
        .zip(out3.iter_mut())
        .zip(ch2)
        .zip(ch3)
    {
        let c2 = f32::from(c2) / 65536.0;
        let c3 = f32::from(c3) / 65536.0;
        *t = (c3 - c2 + SRH_SUBTRACTED_BASE).clamp(0.0, 1.0);
        *o2 = c2.clamp(0.0, 1.0);
        *o3 = c3.clamp(0.0, 1.0);
    }
    out
}

fn interleaved_rgb<T: Copy>(
    height: usize,
    width: usize,
    data: &[T],
    scale: impl Fn(T) -> f32,
) -> Image {
    let len = height * width;
    debug_assert_eq!(data.len(), 3 * len);
    let mut out = Image::zeros(3, height, width);
    let (r, rest) = out.data.split_at_mut(len);
    let (g, b) = rest.split_at_mut(len);
    for (((pixel, r), g), b) in data
        .chunks_exact(3)
        .zip(r.iter_mut())
        .zip(g.iter_mut())
        .zip(b.iter_mut())
    {
        *r = scale(pixel[0]);
        *g = scale(pixel[1]);
        *b = scale(pixel[2]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srh_channels_are_third_ch2_ch3_and_clamped() {
        let decoded = Decoded::Srh {
            height: 1,
            width: 3,
            ch2: vec![0, 65535, 10000],
            ch3: vec![65535, 0, 20000],
        };
        let image = base_process(&decoded);
        assert_eq!((image.channels, image.height, image.width), (3, 1, 3));
        let third = image.plane(0);
        // 65535/65536 + 5000/65536 > 1 is clamped; 0 - 65535/65536 + base < 0 too.
        assert_eq!(third[0], 1.0);
        assert_eq!(third[1], 0.0);
        assert_eq!(third[2], (20000.0 - 10000.0 + 5000.0) / 65536.0);
        assert_eq!(image.plane(1), &[0.0, 65535.0 / 65536.0, 10000.0 / 65536.0]);
        assert_eq!(image.plane(2), &[65535.0 / 65536.0, 0.0, 20000.0 / 65536.0]);
    }

    #[test]
    fn rgb_and_gray_are_scaled_to_unit_range() {
        let rgb = base_process(&Decoded::Rgb8 {
            height: 1,
            width: 2,
            data: vec![0, 128, 255, 1, 2, 3],
        });
        assert_eq!(rgb.plane(0), &[0.0, 1.0 / 255.0]);
        assert_eq!(rgb.plane(1), &[128.0 / 255.0, 2.0 / 255.0]);
        assert_eq!(rgb.plane(2), &[1.0, 3.0 / 255.0]);
        let gray = base_process(&Decoded::Gray8 {
            height: 1,
            width: 2,
            data: vec![51, 255],
        });
        for c in 0..3 {
            assert_eq!(gray.plane(c), &[0.2, 1.0]);
        }
        let rgb16 = base_process(&Decoded::Rgb16 {
            height: 1,
            width: 1,
            data: vec![65535, 0, 32768],
        });
        assert_eq!(rgb16.data, vec![1.0, 0.0, 32768.0 / 65535.0]);
    }
}
