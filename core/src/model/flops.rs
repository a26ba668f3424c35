//! FLOP and parameter counts for any config at any token count.
//!
//! Convention (OpenCLIP `docs/model_profile.csv`): one multiply-add is two
//! FLOPs and only matrix products count; norms, softmax and activations
//! are lower-order and left out. Training costs about 3× the forward pass
//! (backward computes two products per forward product).

use super::config::{ClipConfig, TextConfig, VisionConfig};

/// Forward multiply-adds of `layers` pre-LN blocks over `tokens` tokens.
fn blocks_macs(tokens: u64, width: u64, mlp: u64, layers: u64) -> u64 {
    let projections = 4 * tokens * width * width; // q, k, v, out
    let attention = 2 * tokens * tokens * width; // q·kᵀ and attn·v
    let mlp = 2 * tokens * width * mlp;
    layers * (projections + attention + mlp)
}

/// Forward FLOPs of one image with `patches` patch tokens (CLS added).
pub fn vision_flops(v: &VisionConfig, embed_dim: usize, patches: usize) -> u64 {
    let (w, p) = (v.width as u64, v.patch_size as u64);
    let patches = patches as u64;
    let embed = patches * 3 * p * p * w;
    let blocks = blocks_macs(patches + 1, w, v.mlp_width as u64, v.layers as u64);
    2 * (embed + blocks + w * embed_dim as u64)
}

/// Forward FLOPs of one caption of `len` tokens.
pub fn text_flops(t: &TextConfig, embed_dim: usize, len: usize) -> u64 {
    let w = t.width as u64;
    let blocks = blocks_macs(len as u64, w, t.mlp_width as u64, t.layers as u64);
    2 * (blocks + w * embed_dim as u64)
}

/// FLOPs of one image–text pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairFlops {
    /// Image tower forward.
    pub image: u64,
    /// Text tower forward.
    pub text: u64,
}

impl PairFlops {
    /// Both towers, forward.
    pub fn forward(&self) -> u64 {
        self.image + self.text
    }

    /// A training step's cost per pair: forward + backward ≈ 3 × forward.
    pub fn train(&self) -> u64 {
        3 * self.forward()
    }
}

impl ClipConfig {
    /// FLOPs per pair at `patches` image tokens (CLS not counted) and `len`
    /// text tokens.
    pub fn flops(&self, patches: usize, len: usize) -> PairFlops {
        PairFlops {
            image: vision_flops(&self.vision, self.embed_dim, patches),
            text: text_flops(&self.text, self.embed_dim, len),
        }
    }

    /// FLOPs per pair at the model's default image size and context length.
    pub fn default_flops(&self) -> PairFlops {
        let g = self.vision.grid();
        self.flops(g * g, self.text.context_length)
    }

    /// Trainable and frozen parameter count (sin-cos tables included).
    pub fn num_params(&self) -> u64 {
        let (vision, text) = self.tower_params();
        vision + text + 1
    }

    /// Parameters of the image and the text tower (the temperature, in
    /// neither, is the one more that [`ClipConfig::num_params`] counts).
    pub fn tower_params(&self) -> (u64, u64) {
        let block = |w: u64, mlp: u64| 4 * (w * w + w) + (w * mlp + mlp) + (mlp * w + w) + 4 * w;
        let v = &self.vision;
        let (vw, p, g) = (v.width as u64, v.patch_size as u64, v.grid() as u64);
        let vision = vw * 3 * p * p
            + vw
            + (1 + g * g) * vw
            + if v.ln_pre { 2 * vw } else { 0 }
            + v.layers as u64 * block(vw, v.mlp_width as u64)
            + 2 * vw
            + vw * self.embed_dim as u64;
        let t = &self.text;
        let tw = t.width as u64;
        let text = t.vocab_size as u64 * tw
            + t.context_length as u64 * tw
            + t.layers as u64 * block(tw, t.mlp_width as u64)
            + 2 * tw
            + tw * self.embed_dim as u64;
        (vision, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gflops(x: u64) -> f64 {
        x as f64 / 1e9
    }

    fn within(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want
    }

    /// OpenCLIP `docs/model_profile.csv`, forward GFLOPs per sample.
    #[test]
    fn agrees_with_openclip_model_profile() {
        for (cfg, image, text) in [
            (ClipConfig::vit_b16(), 35.13, 5.96),
            (ClipConfig::vit_l14(), 162.03, 13.3),
            (ClipConfig::clipa_h14(), 334.59, 19.43),
        ] {
            let f = cfg.default_flops();
            assert!(
                within(gflops(f.image), image, 0.05),
                "image {} vs {image}",
                gflops(f.image)
            );
            assert!(
                within(gflops(f.text), text, 0.05),
                "text {} vs {text}",
                gflops(f.text)
            );
        }
    }

    /// A hand count for the tiny model: width 64, mlp 256, 2 layers,
    /// patch 4 at 32 px (64 patches + CLS = 65 tokens), 32 text tokens,
    /// embed 64.
    #[test]
    fn tiny_hand_count() {
        let f = ClipConfig::tiny().default_flops();
        // per block: 4·65·64² + 2·65²·64 + 2·65·64·256 = 1,064,960 + 540,800 + 2,129,920
        let vision_block = 1_064_960 + 540_800 + 2_129_920;
        let vision = 2 * (64 * 48 * 64 + 2 * vision_block + 64 * 64);
        assert_eq!(f.image, vision as u64);
        // per block: 4·32·64² + 2·32²·64 + 2·32·64·256 = 524,288 + 131,072 + 1,048,576
        let text_block = 524_288 + 131_072 + 1_048_576;
        assert_eq!(f.text, 2 * (2 * text_block + 64 * 64) as u64);
        assert_eq!(f.train(), 3 * (f.image + f.text));
    }

    /// Fewer tokens, fewer FLOPs: a quarter of the patches costs less than
    /// a third of the image tower (attention is quadratic).
    #[test]
    fn token_reduction_saves_compute() {
        let cfg = ClipConfig::clipa_l16();
        let full = cfg.flops(196, 32);
        let reduced = cfg.flops(49, 8);
        assert!(reduced.image * 3 < full.image);
        assert!(reduced.text * 3 < full.text);
    }

    /// Parameter counts: OpenCLIP's fixtures (3,379,969 for the OpenAI-style
    /// tiny model) and the bench README (19.14 M for bench-tiny).
    #[test]
    fn parameter_counts() {
        assert_eq!(ClipConfig::tiny().num_params(), 3_379_969);
        let bench = ClipConfig::bench_tiny().num_params() as f64 / 1e6;
        assert!((bench - 19.14).abs() < 0.01, "{bench}");
    }
}
