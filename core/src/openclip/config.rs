//! OpenCLIP model-config JSON: parsing into a [`ClipConfig`] and writing
//! it back. Unknown keys and unsupported values are errors that name them.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::model::{
    ClipConfig, EvalResize, PosEmbed, TextConfig, TextPool, TokenizerConfig, VisionConfig,
    VisionPool,
};
use crate::nn::Activation;
use crate::reduce::TextReduction;
use crate::{Error, Result};

/// A parsed OpenCLIP model config.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenClipConfig {
    /// The equivalent clipa config.
    pub clip: ClipConfig,
    /// Whether the text tower is nested under `text.` (`custom_text`).
    pub custom_text: bool,
    /// `hf_tokenizer_name`, when the config names one.
    pub hf_tokenizer: Option<String>,
    /// clipa_torch's `text_mask` (`ViT-L-16-CL8-Syntax-GAP.json`): the text
    /// reduction the model was trained with; `None` for truncation.
    pub text_mask: Option<TextReduction>,
}

fn unsupported(key: &str, value: &Value) -> Error {
    Error::Config(format!(
        "OpenCLIP config: unsupported value {value} for '{key}'"
    ))
}

/// Reads typed values out of one JSON object, remembering which keys were
/// used so that every unknown key can be reported.
struct Fields<'a> {
    section: &'a str,
    map: &'a Map<String, Value>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(section: &'a str, value: &'a Value) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| {
            Error::Config(format!("OpenCLIP config: '{section}' must be an object"))
        })?;
        Ok(Self {
            section,
            map,
            used: BTreeSet::new(),
        })
    }

    fn key(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &'static str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| unsupported(&self.key(key), v)),
            None => default.ok_or_else(|| {
                Error::Config(format!("OpenCLIP config: missing '{}'", self.key(key)))
            }),
        }
    }

    fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| unsupported(&self.key(key), v)),
            None => Ok(default),
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().ok_or_else(|| unsupported(&self.key(key), v)),
            None => Ok(default),
        }
    }

    fn str(&mut self, key: &'static str) -> Result<Option<&'a str>> {
        match self.get(key) {
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| unsupported(&self.key(key), v)),
            None => Ok(None),
        }
    }

    /// A key accepted only at a value that changes nothing.
    fn only(&mut self, key: &'static str, ok: impl Fn(&Value) -> bool) -> Result<()> {
        match self.get(key) {
            Some(v) if !ok(v) => Err(unsupported(&self.key(key), v)),
            _ => Ok(()),
        }
    }

    fn activation(&mut self, quick_gelu: bool) -> Result<Activation> {
        let mut act = if quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        // clipa_torch spells the tanh GELU `gelu_approximate`.
        match self.str("gelu_approximate")? {
            Some("tanh") => act = Activation::GeluTanh,
            None | Some("none") => {}
            Some(other) => {
                return Err(unsupported(
                    &self.key("gelu_approximate"),
                    &Value::from(other),
                ));
            }
        }
        if let Some(kwargs) = self.get("act_kwargs") {
            let mut f = Fields::new("act_kwargs", kwargs)?;
            match f.str("approximate")? {
                Some("tanh") => act = Activation::GeluTanh,
                None | Some("none") => {}
                Some(other) => {
                    return Err(unsupported(
                        &self.key("act_kwargs.approximate"),
                        &Value::from(other),
                    ));
                }
            }
            f.finish()?;
        }
        Ok(act)
    }

    fn ln_eps(&mut self) -> Result<f64> {
        let mut eps = 1e-5;
        if let Some(kwargs) = self.get("norm_kwargs") {
            let mut f = Fields::new("norm_kwargs", kwargs)?;
            eps = f.f64("eps", 1e-5)?;
            f.finish()?;
        }
        Ok(eps)
    }

    /// The evaluation resize from `resize_mode` and `interpolation`; `None`
    /// when neither key is present. clipa's centre crop is bicubic
    /// (OpenCLIP's default) and its square resize bilinear (CLIPA's); other
    /// pairs would evaluate differently from the model's source, so they are
    /// refused.
    fn eval_resize(&mut self) -> Result<Option<EvalResize>> {
        let mode = self.str("resize_mode")?;
        let filter = self.str("interpolation")?;
        let resize = match (mode, filter) {
            (None, None) => return Ok(None),
            (None | Some("shortest"), None | Some("bicubic")) => EvalResize::CenterCrop,
            (Some("squash"), Some("bilinear")) => EvalResize::Squash,
            (None | Some("shortest") | Some("squash"), Some(f)) => {
                return Err(Error::Config(format!(
                    "OpenCLIP config: unsupported '{}' {f:?} for resize mode {:?} \
                     (clipa resizes shortest+bicubic or squash+bilinear)",
                    self.key("interpolation"),
                    mode.unwrap_or("shortest")
                )));
            }
            (Some("squash"), None) => {
                return Err(Error::Config(format!(
                    "OpenCLIP config: '{}' squash needs interpolation \"bilinear\" \
                     (clipa's square resize is CLIPA's bilinear one)",
                    self.key("resize_mode")
                )));
            }
            (Some(other), _) => {
                return Err(unsupported(&self.key("resize_mode"), &Value::from(other)));
            }
        };
        Ok(Some(resize))
    }

    /// A mean or std triple.
    fn triple(&mut self, key: &'static str) -> Result<Option<[f32; 3]>> {
        match self.get(key) {
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|_| unsupported(&self.key(key), v)),
            None => Ok(None),
        }
    }

    fn finish(self) -> Result<()> {
        let unknown: Vec<String> = self
            .map
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .map(|k| self.key(k))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "OpenCLIP config: unsupported key(s) {}",
                unknown.join(", ")
            )))
        }
    }
}

fn heads_from(f: &mut Fields<'_>, width: usize) -> Result<usize> {
    if f.map.contains_key("heads") {
        return f.usize("heads", None);
    }
    let head_width = f.usize("head_width", Some(64))?;
    if head_width == 0 || !width.is_multiple_of(head_width) {
        return Err(Error::Config(format!(
            "OpenCLIP config: head_width {head_width} does not divide width {width}"
        )));
    }
    Ok(width / head_width)
}

/// The ratio OpenCLIP turns back into `mlp` with `int(width · ratio)`.
fn mlp_ratio(width: usize, mlp: usize) -> f64 {
    let mut r = mlp as f64 / width as f64;
    while ((width as f64 * r) as usize) < mlp {
        r = r.next_up();
    }
    r
}

fn mlp_from(f: &mut Fields<'_>, width: usize) -> Result<usize> {
    Ok((width as f64 * f.f64("mlp_ratio", 4.0)?) as usize)
}

/// Parses an OpenCLIP model-config JSON (`embed_dim`, `vision_cfg`,
/// `text_cfg`), or a hub `open_clip_config.json` (`model_cfg` plus
/// `preprocess_cfg`, whose mean, std and resize become the model's own).
/// Keys clipa does not model are errors that name them; keys that only
/// matter to training or preprocessing are accepted at values that change
/// nothing in the weights.
pub fn parse_config(json: &str) -> Result<OpenClipConfig> {
    let root: Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(format!("OpenCLIP config is not JSON: {e}")))?;
    if root.get("model_cfg").is_some() {
        return parse_hub_config(&root);
    }
    parse_model_config(&root)
}

/// `{"model_cfg": {..}, "preprocess_cfg": {..}}`.
fn parse_hub_config(root: &Value) -> Result<OpenClipConfig> {
    let mut top = Fields::new("", root)?;
    let model = top
        .get("model_cfg")
        .ok_or_else(|| Error::Config("OpenCLIP config: missing 'model_cfg'".into()))?;
    let pre = top.get("preprocess_cfg");
    top.finish()?;
    let mut out = parse_model_config(model)?;
    if let Some(pre) = pre {
        let clip = &mut out.clip;
        let mut p = Fields::new("preprocess_cfg", pre)?;
        if let Some(mean) = p.triple("mean")? {
            clip.normalization.mean = mean;
        }
        if let Some(std) = p.triple("std")? {
            clip.normalization.std = std;
        }
        if let Some(resize) = p.eval_resize()? {
            clip.eval_resize = resize;
        }
        let image_size = clip.vision.image_size;
        p.only("size", |x| {
            x.as_u64() == Some(image_size as u64)
                || x.as_array()
                    .is_some_and(|a| a.iter().all(|v| v.as_u64() == Some(image_size as u64)))
        })?;
        p.only("fill_color", |_| true)?;
        p.finish()?;
    }
    Ok(out)
}

fn parse_model_config(root: &Value) -> Result<OpenClipConfig> {
    let mut top = Fields::new("", root)?;
    let embed_dim = top.usize("embed_dim", None)?;
    let quick_gelu = top.bool("quick_gelu", false)?;
    let custom_text = top.bool("custom_text", false)?;
    let init_logit_scale = top.f64("init_logit_scale", (1.0f64 / 0.07).ln())?;
    let init_logit_bias = match top.get("init_logit_bias") {
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| unsupported("init_logit_bias", v))?,
        ),
        None => None,
    };
    top.only("cast_dtype", |_| true)?;
    let vision_value = top
        .get("vision_cfg")
        .ok_or_else(|| Error::Config("OpenCLIP config: missing 'vision_cfg'".into()))?;
    let text_value = top
        .get("text_cfg")
        .ok_or_else(|| Error::Config("OpenCLIP config: missing 'text_cfg'".into()))?;
    top.finish()?;

    let Vision {
        config: vision,
        eval_resize,
        mean,
        std,
    } = parse_vision(vision_value, quick_gelu)?;
    let (text, hf_tokenizer, text_mask) = parse_text(text_value, quick_gelu)?;

    let mut clip = ClipConfig::new(embed_dim, vision, text)
        .with_init_logit_scale(init_logit_scale)
        .with_init_logit_bias(init_logit_bias)
        .with_eval_resize(eval_resize);
    if let Some(mean) = mean {
        clip.normalization.mean = mean;
    }
    if let Some(std) = std {
        clip.normalization.std = std;
    }
    clip.validate()?;
    Ok(OpenClipConfig {
        clip,
        custom_text,
        hf_tokenizer,
        text_mask,
    })
}

/// `vision_cfg` and the preprocessing it carries.
struct Vision {
    config: VisionConfig,
    eval_resize: EvalResize,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

/// Parses `vision_cfg` (unknown or unsupported keys are errors).
fn parse_vision(vision_value: &Value, quick_gelu: bool) -> Result<Vision> {
    let mut v = Fields::new("vision_cfg", vision_value)?;
    let width = v.usize("width", Some(768))?;
    let vision = VisionConfig {
        image_size: v.usize("image_size", Some(224))?,
        patch_size: v.usize("patch_size", Some(16))?,
        width,
        layers: v.usize("layers", Some(12))?,
        heads: heads_from(&mut v, width)?,
        mlp_width: mlp_from(&mut v, width)?,
        // `pos_embed` is clipa_torch's name for OpenCLIP's `pos_embed_type`.
        pos_embed: match v.str("pos_embed_type")?.or(v.str("pos_embed")?) {
            None | Some("learnable") => PosEmbed::Learnable,
            Some("sin_cos_2d") => PosEmbed::SinCos2d,
            Some(other) => {
                return Err(unsupported(
                    "vision_cfg.pos_embed_type",
                    &Value::from(other),
                ));
            }
        },
        ln_pre: !v.bool("no_ln_pre", false)? && v.bool("ln_pre", true)?,
        // Legacy `global_average_pool` means the mean over CLS and patches,
        // then `ln_post` (OpenCLIP `_global_pool` before `pool_type`).
        pool: match (v.str("pool_type")?, v.bool("global_average_pool", false)?) {
            (None | Some("tok"), false) => VisionPool::Cls,
            (None, true) => VisionPool::AvgAll,
            (Some("avg"), _) => VisionPool::AvgPatches,
            (Some(other), _) => {
                return Err(unsupported("vision_cfg.pool_type", &Value::from(other)));
            }
        },
        final_ln_after_pool: v.bool("final_ln_after_pool", false)?
            || v.map.get("global_average_pool") == Some(&Value::Bool(true)),
        activation: v.activation(quick_gelu)?,
        ln_eps: v.ln_eps()?,
    };
    v.only("ls_init_value", |_| false)?;
    v.only("patch_dropout", |x| x.as_f64() == Some(0.0))?;
    v.only("attentional_pool", |x| x == &Value::Bool(false))?;
    v.only("input_patchnorm", |x| x == &Value::Bool(false))?;
    v.only("output_tokens", |x| x == &Value::Bool(false))?;
    v.only("timm_model_name", |_| false)?;
    v.only("pool_style", |x| x.as_str() == Some("open_clip"))?;
    let eval_resize = v.eval_resize()?.unwrap_or_default();
    let (mean, std) = (v.triple("image_mean")?, v.triple("image_std")?);
    v.finish()?;
    Ok(Vision {
        config: vision,
        eval_resize,
        mean,
        std,
    })
}

/// Parses `text_cfg` (unknown or unsupported keys are errors): the tower,
/// the HF tokenizer's name, and a clipa_torch `text_mask`.
fn parse_text(
    text_value: &Value,
    quick_gelu: bool,
) -> Result<(TextConfig, Option<String>, Option<TextReduction>)> {
    let mut t = Fields::new("text_cfg", text_value)?;
    let width = t.usize("width", Some(512))?;
    let hf_tokenizer = t.str("hf_tokenizer_name")?.map(str::to_string);
    let tokenizer = match &hf_tokenizer {
        None => TokenizerConfig::ClipBpe,
        Some(name) => {
            // OpenCLIP's HFTokenizer: `clean="whitespace"` by default, and
            // `strip_sep_token` from the config's `tokenizer_kwargs`.
            let mut strip_sep_token = false;
            if let Some(kwargs) = t.get("tokenizer_kwargs") {
                let mut k = Fields::new("text_cfg.tokenizer_kwargs", kwargs)?;
                strip_sep_token = k.bool("strip_sep_token", false)?;
                k.only("clean", |x| x.as_str() == Some("whitespace"))?;
                k.finish()?;
            }
            // BERT's uncased vocabularies lower-case and strip accents.
            let uncased = !name.contains("-cased");
            TokenizerConfig::WordPiece {
                lowercase: uncased,
                strip_accents: uncased,
                strip_sep_token,
            }
        }
    };
    let text_mask = match t.str("text_mask")? {
        None | Some("first") => None,
        Some("syntax") => Some(TextReduction::Syntax),
        Some("random") => Some(TextReduction::Random),
        Some("block") => Some(TextReduction::Block),
        Some(other) => return Err(unsupported("text_cfg.text_mask", &Value::from(other))),
    };
    // clipa_torch's `attention_mask: false` is OpenCLIP's `no_causal_mask`.
    let causal = !t.bool("no_causal_mask", false)? && t.bool("attention_mask", true)?;
    let text = TextConfig {
        context_length: t.usize("context_length", Some(77))?,
        vocab_size: t.usize("vocab_size", Some(49_408))?,
        width,
        layers: t.usize("layers", Some(12))?,
        heads: t.usize("heads", Some(8))?,
        mlp_width: mlp_from(&mut t, width)?,
        causal,
        pool: match t.str("pool_type")? {
            None | Some("argmax") => TextPool::Argmax,
            Some("last") => TextPool::Last,
            Some("first") => TextPool::First,
            Some(other) => return Err(unsupported("text_cfg.pool_type", &Value::from(other))),
        },
        tokenizer,
        activation: t.activation(quick_gelu)?,
        ln_eps: t.ln_eps()?,
    };
    t.only("pad_id", |x| x.as_u64() == Some(0))?;
    t.only("pool_style", |x| x.as_str() == Some("open_clip"))?;
    t.only("bert_tokenizer", |x| x == &Value::Bool(false))?;
    t.only("ls_init_value", |_| false)?;
    t.only("embed_cls", |x| x == &Value::Bool(false))?;
    t.only("proj_bias", |x| x == &Value::Bool(false))?;
    t.only("proj_type", |x| x.as_str() == Some("linear"))?;
    t.only("final_ln_after_pool", |x| x == &Value::Bool(false))?;
    t.only("output_tokens", |x| x == &Value::Bool(false))?;
    t.only("hf_model_name", |_| false)?;
    t.finish()?;
    Ok((text, hf_tokenizer, text_mask))
}

/// Writes an OpenCLIP model-config JSON for `cfg` (the inverse of
/// [`parse_config`]). A model OpenCLIP cannot express (the CLIPA-v1 mean
/// over CLS and patches) is an error.
pub fn config_json(cfg: &ClipConfig, custom_text: bool) -> Result<Value> {
    if cfg.vision.pool == VisionPool::AvgAll {
        return Err(Error::Config(
            "OpenCLIP has no pool over CLS and patch tokens (CLIPA-v1 avg_all); this model cannot be exported".into(),
        ));
    }
    let act = |a: Activation| match a {
        Activation::GeluTanh => serde_json::json!({"approximate": "tanh"}),
        _ => serde_json::json!({}),
    };
    let v = &cfg.vision;
    let t = &cfg.text;
    let vision = serde_json::json!({
        "image_size": v.image_size,
        "layers": v.layers,
        "width": v.width,
        "head_width": v.width / v.heads,
        "mlp_ratio": mlp_ratio(v.width, v.mlp_width),
        "patch_size": v.patch_size,
        "no_ln_pre": !v.ln_pre,
        "pool_type": if v.pool == VisionPool::Cls { "tok" } else { "avg" },
        "final_ln_after_pool": v.final_ln_after_pool,
        "pos_embed_type": if v.pos_embed == PosEmbed::SinCos2d { "sin_cos_2d" } else { "learnable" },
        "act_kwargs": act(v.activation),
        "norm_kwargs": {"eps": v.ln_eps},
        "image_mean": cfg.normalization.mean,
        "image_std": cfg.normalization.std,
    });
    let mut text = serde_json::json!({
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": mlp_ratio(t.width, t.mlp_width),
        "no_causal_mask": !t.causal,
        "pool_type": match t.pool { TextPool::Argmax => "argmax", TextPool::Last => "last", TextPool::First => "first" },
        "act_kwargs": act(t.activation),
        "norm_kwargs": {"eps": t.ln_eps},
    });
    if let TokenizerConfig::WordPiece {
        lowercase,
        strip_sep_token,
        ..
    } = t.tokenizer
    {
        let name = if lowercase {
            "bert-base-uncased"
        } else {
            "bert-base-cased"
        };
        text["hf_tokenizer_name"] = Value::from(name);
        text["tokenizer_kwargs"] = serde_json::json!({"strip_sep_token": strip_sep_token});
    }
    let mut root = serde_json::json!({
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision,
        "text_cfg": text,
    });
    if cfg.eval_resize == EvalResize::Squash {
        root["vision_cfg"]["resize_mode"] = Value::from("squash");
        root["vision_cfg"]["interpolation"] = Value::from("bilinear");
    }
    if v.activation == Activation::QuickGelu {
        root["quick_gelu"] = Value::Bool(true);
    }
    if custom_text {
        root["custom_text"] = Value::Bool(true);
    }
    Ok(root)
}
