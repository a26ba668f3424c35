//! OpenCLIP interoperability: model-config JSON and state-dict key mapping,
//! both directions.
//!
//! Key layout follows OpenCLIP's `CLIP` (and `CustomTextCLIP` when
//! `custom_text` is set, which nests the text tower under `text.`).
//! Differences handled here:
//! - `attn.in_proj_weight` `[3w, w]` is split into clipa's q/k/v weights;
//! - every `nn.Linear` weight is `[out, in]` in PyTorch and `[in, out]` in
//!   clipa, so it is transposed; `visual.proj` and `text_projection` are
//!   plain `[in, out]` matrices in both;
//! - `logit_scale` is 0-d in OpenCLIP and `[1]` in clipa.
//!
//! Every transform is a pure data movement, so import then export gives back
//! the same tensors bit for bit.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::TensorData;
use serde_json::{Map, Value};

use crate::model::{ClipConfig, PosEmbed, TextConfig, TextPool, VisionConfig, VisionPool};
use crate::nn::Activation;
use crate::state::StateDict;
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
    if head_width == 0 || width % head_width != 0 {
        return Err(Error::Config(format!(
            "OpenCLIP config: head_width {head_width} does not divide width {width}"
        )));
    }
    Ok(width / head_width)
}

fn mlp_from(f: &mut Fields<'_>, width: usize) -> Result<usize> {
    Ok((width as f64 * f.f64("mlp_ratio", 4.0)?) as usize)
}

/// Parses an OpenCLIP model-config JSON (`embed_dim`, `vision_cfg`,
/// `text_cfg`). Keys clipa does not model are errors that name them; keys
/// that only matter to training or preprocessing are accepted at values
/// that change nothing in the weights.
pub fn parse_config(json: &str) -> Result<OpenClipConfig> {
    let root: Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(format!("OpenCLIP config is not JSON: {e}")))?;
    let mut top = Fields::new("", &root)?;
    let embed_dim = top.usize("embed_dim", None)?;
    let quick_gelu = top.bool("quick_gelu", false)?;
    let custom_text = top.bool("custom_text", false)?;
    let init_logit_scale = top.f64("init_logit_scale", (1.0f64 / 0.07).ln())?;
    top.only("init_logit_bias", |_| false)?;
    top.only("cast_dtype", |_| true)?;
    let vision_value = top
        .get("vision_cfg")
        .ok_or_else(|| Error::Config("OpenCLIP config: missing 'vision_cfg'".into()))?;
    let text_value = top
        .get("text_cfg")
        .ok_or_else(|| Error::Config("OpenCLIP config: missing 'text_cfg'".into()))?;
    top.finish()?;

    let mut v = Fields::new("vision_cfg", vision_value)?;
    let width = v.usize("width", Some(768))?;
    let vision = VisionConfig {
        image_size: v.usize("image_size", Some(224))?,
        patch_size: v.usize("patch_size", Some(16))?,
        width,
        layers: v.usize("layers", Some(12))?,
        heads: heads_from(&mut v, width)?,
        mlp_width: mlp_from(&mut v, width)?,
        pos_embed: match v.str("pos_embed_type")? {
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
        pool: match (v.str("pool_type")?, v.bool("global_average_pool", false)?) {
            (None | Some("tok"), false) => VisionPool::Cls,
            (Some("avg"), _) | (None, true) => VisionPool::AvgPatches,
            (Some(other), _) => {
                return Err(unsupported("vision_cfg.pool_type", &Value::from(other)));
            }
        },
        final_ln_after_pool: v.bool("final_ln_after_pool", false)?,
        activation: v.activation(quick_gelu)?,
        ln_eps: v.ln_eps()?,
    };
    v.only("ls_init_value", |_| false)?;
    v.only("patch_dropout", |x| x.as_f64() == Some(0.0))?;
    v.only("attentional_pool", |x| x == &Value::Bool(false))?;
    v.only("input_patchnorm", |x| x == &Value::Bool(false))?;
    v.only("output_tokens", |x| x == &Value::Bool(false))?;
    v.only("timm_model_name", |_| false)?;
    for preprocessing in ["image_mean", "image_std", "interpolation", "resize_mode"] {
        v.only(preprocessing, |_| true)?;
    }
    let (mean, std) = (
        v.map.get("image_mean").cloned(),
        v.map.get("image_std").cloned(),
    );
    v.finish()?;

    let mut t = Fields::new("text_cfg", text_value)?;
    let width = t.usize("width", Some(512))?;
    let text = TextConfig {
        context_length: t.usize("context_length", Some(77))?,
        vocab_size: t.usize("vocab_size", Some(49_408))?,
        width,
        layers: t.usize("layers", Some(12))?,
        heads: t.usize("heads", Some(8))?,
        mlp_width: mlp_from(&mut t, width)?,
        causal: !t.bool("no_causal_mask", false)?,
        pool: match t.str("pool_type")? {
            None | Some("argmax") => TextPool::Argmax,
            Some("last") => TextPool::Last,
            Some("first") => TextPool::First,
            Some(other) => return Err(unsupported("text_cfg.pool_type", &Value::from(other))),
        },
        activation: t.activation(quick_gelu)?,
        ln_eps: t.ln_eps()?,
    };
    let hf_tokenizer = t.str("hf_tokenizer_name")?.map(str::to_string);
    t.only("tokenizer_kwargs", |_| true)?;
    t.only("pad_id", |_| true)?;
    t.only("ls_init_value", |_| false)?;
    t.only("embed_cls", |x| x == &Value::Bool(false))?;
    t.only("proj_bias", |x| x == &Value::Bool(false))?;
    t.only("proj_type", |x| x.as_str() == Some("linear"))?;
    t.only("final_ln_after_pool", |x| x == &Value::Bool(false))?;
    t.only("output_tokens", |x| x == &Value::Bool(false))?;
    t.only("hf_model_name", |_| false)?;
    t.finish()?;

    let mut clip = ClipConfig::new(embed_dim, vision, text).with_init_logit_scale(init_logit_scale);
    if let (Some(mean), Some(std)) = (mean, std) {
        let triple = |x: &Value, key: &str| -> Result<[f32; 3]> {
            serde_json::from_value(x.clone()).map_err(|_| unsupported(key, x))
        };
        clip.normalization.mean = triple(&mean, "vision_cfg.image_mean")?;
        clip.normalization.std = triple(&std, "vision_cfg.image_std")?;
    }
    clip.validate()?;
    Ok(OpenClipConfig {
        clip,
        custom_text,
        hf_tokenizer,
    })
}

/// Writes an OpenCLIP model-config JSON for `cfg` (the inverse of
/// [`parse_config`]).
pub fn config_json(cfg: &ClipConfig, custom_text: bool) -> Value {
    let act = |a: Activation| match a {
        Activation::GeluTanh => serde_json::json!({"approximate": "tanh"}),
        _ => serde_json::json!({}),
    };
    let v = &cfg.vision;
    let t = &cfg.text;
    let mut vision = serde_json::json!({
        "image_size": v.image_size,
        "layers": v.layers,
        "width": v.width,
        "head_width": v.width / v.heads,
        "mlp_ratio": v.mlp_width as f64 / v.width as f64,
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
    if v.pool == VisionPool::AvgAll {
        // OpenCLIP has no mean-over-CLS-and-patches pool.
        vision["pool_type"] = Value::from("avg_all");
    }
    let text = serde_json::json!({
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_width as f64 / t.width as f64,
        "no_causal_mask": !t.causal,
        "pool_type": match t.pool { TextPool::Argmax => "argmax", TextPool::Last => "last", TextPool::First => "first" },
        "act_kwargs": act(t.activation),
        "norm_kwargs": {"eps": t.ln_eps},
    });
    let mut root = serde_json::json!({
        "embed_dim": cfg.embed_dim,
        "vision_cfg": vision,
        "text_cfg": text,
    });
    if v.activation == Activation::QuickGelu {
        root["quick_gelu"] = Value::Bool(true);
    }
    if custom_text {
        root["custom_text"] = Value::Bool(true);
    }
    root
}

/// How one clipa tensor is stored in OpenCLIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Same shape and order.
    Same,
    /// A 2-D transpose (`nn.Linear` weights).
    Transposed,
    /// Rows `[part·w, (part+1)·w)` of `in_proj_weight`, transposed.
    InProjWeight(usize),
    /// Elements `[part·w, (part+1)·w)` of `in_proj_bias`.
    InProjBias(usize),
    /// A `[1]` tensor stored 0-d.
    Scalar,
}

/// One mapping rule: clipa path, OpenCLIP key, layout, clipa shape.
#[derive(Clone, Debug)]
struct Rule {
    clipa: String,
    openclip: String,
    layout: Layout,
    shape: Vec<usize>,
}

fn block_rules(rules: &mut Vec<Rule>, clipa: &str, openclip: &str, w: usize, mlp: usize) {
    let mut add = |c: &str, o: &str, layout: Layout, shape: Vec<usize>| {
        rules.push(Rule {
            clipa: format!("{clipa}.{c}"),
            openclip: format!("{openclip}.{o}"),
            layout,
            shape,
        })
    };
    for ln in ["ln_1", "ln_2"] {
        add(
            &format!("{ln}.gamma"),
            &format!("{ln}.weight"),
            Layout::Same,
            vec![w],
        );
        add(
            &format!("{ln}.beta"),
            &format!("{ln}.bias"),
            Layout::Same,
            vec![w],
        );
    }
    for (part, name) in ["query", "key", "value"].iter().enumerate() {
        add(
            &format!("attn.{name}.weight"),
            "attn.in_proj_weight",
            Layout::InProjWeight(part),
            vec![w, w],
        );
        add(
            &format!("attn.{name}.bias"),
            "attn.in_proj_bias",
            Layout::InProjBias(part),
            vec![w],
        );
    }
    add(
        "attn.out.weight",
        "attn.out_proj.weight",
        Layout::Transposed,
        vec![w, w],
    );
    add("attn.out.bias", "attn.out_proj.bias", Layout::Same, vec![w]);
    add(
        "mlp.c_fc.weight",
        "mlp.c_fc.weight",
        Layout::Transposed,
        vec![w, mlp],
    );
    add("mlp.c_fc.bias", "mlp.c_fc.bias", Layout::Same, vec![mlp]);
    add(
        "mlp.c_proj.weight",
        "mlp.c_proj.weight",
        Layout::Transposed,
        vec![mlp, w],
    );
    add("mlp.c_proj.bias", "mlp.c_proj.bias", Layout::Same, vec![w]);
}

fn rules(cfg: &ClipConfig, custom_text: bool) -> Vec<Rule> {
    let mut r = Vec::new();
    let add = |r: &mut Vec<Rule>, c: &str, o: &str, layout: Layout, shape: Vec<usize>| {
        r.push(Rule {
            clipa: c.to_string(),
            openclip: o.to_string(),
            layout,
            shape,
        })
    };
    let v = &cfg.vision;
    let (w, e, g, p) = (v.width, cfg.embed_dim, v.grid(), v.patch_size);
    add(
        &mut r,
        "visual.conv1",
        "visual.conv1.weight",
        Layout::Same,
        vec![w, 3, p, p],
    );
    add(
        &mut r,
        "visual.class_embedding",
        "visual.class_embedding",
        Layout::Same,
        vec![w],
    );
    add(
        &mut r,
        "visual.positional_embedding",
        "visual.positional_embedding",
        Layout::Same,
        vec![1 + g * g, w],
    );
    if v.ln_pre {
        add(
            &mut r,
            "visual.ln_pre.gamma",
            "visual.ln_pre.weight",
            Layout::Same,
            vec![w],
        );
        add(
            &mut r,
            "visual.ln_pre.beta",
            "visual.ln_pre.bias",
            Layout::Same,
            vec![w],
        );
    }
    for i in 0..v.layers {
        block_rules(
            &mut r,
            &format!("visual.blocks.{i}"),
            &format!("visual.transformer.resblocks.{i}"),
            w,
            v.mlp_width,
        );
    }
    add(
        &mut r,
        "visual.ln_post.gamma",
        "visual.ln_post.weight",
        Layout::Same,
        vec![w],
    );
    add(
        &mut r,
        "visual.ln_post.beta",
        "visual.ln_post.bias",
        Layout::Same,
        vec![w],
    );
    add(
        &mut r,
        "visual.proj",
        "visual.proj",
        Layout::Same,
        vec![w, e],
    );
    let t = &cfg.text;
    let tw = t.width;
    let pre = if custom_text { "text." } else { "" };
    add(
        &mut r,
        "text.token_embedding.weight",
        &format!("{pre}token_embedding.weight"),
        Layout::Same,
        vec![t.vocab_size, tw],
    );
    add(
        &mut r,
        "text.positional_embedding",
        &format!("{pre}positional_embedding"),
        Layout::Same,
        vec![t.context_length, tw],
    );
    for i in 0..t.layers {
        block_rules(
            &mut r,
            &format!("text.blocks.{i}"),
            &format!("{pre}transformer.resblocks.{i}"),
            tw,
            t.mlp_width,
        );
    }
    add(
        &mut r,
        "text.ln_final.gamma",
        &format!("{pre}ln_final.weight"),
        Layout::Same,
        vec![tw],
    );
    add(
        &mut r,
        "text.ln_final.beta",
        &format!("{pre}ln_final.bias"),
        Layout::Same,
        vec![tw],
    );
    add(
        &mut r,
        "text.text_projection",
        &format!("{pre}text_projection"),
        Layout::Same,
        vec![tw, e],
    );
    add(
        &mut r,
        "logit_scale",
        "logit_scale",
        Layout::Scalar,
        vec![1],
    );
    r
}

/// The shape OpenCLIP stores for the key of `rule`.
fn openclip_shape(rule: &Rule) -> Vec<usize> {
    match rule.layout {
        Layout::Same => rule.shape.clone(),
        Layout::Transposed => vec![rule.shape[1], rule.shape[0]],
        Layout::InProjWeight(_) => vec![3 * rule.shape[0], rule.shape[0]],
        Layout::InProjBias(_) => vec![3 * rule.shape[0]],
        Layout::Scalar => vec![],
    }
}

fn f32s(t: &TensorData) -> Vec<f32> {
    t.clone()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Converts an OpenCLIP state dict into clipa's parameter paths. Every
/// missing, extra or mis-shaped tensor is named in the error.
pub fn import_state(
    openclip: &StateDict,
    cfg: &ClipConfig,
    custom_text: bool,
) -> Result<StateDict> {
    let rules = rules(cfg, custom_text);
    let mut errors = Vec::new();
    let mut out = StateDict::new();
    for rule in &rules {
        let Some(src) = openclip.get(&rule.openclip) else {
            if !errors
                .iter()
                .any(|e: &String| e.ends_with(&format!(" {}", rule.openclip)))
            {
                errors.push(format!("missing tensor {}", rule.openclip));
            }
            continue;
        };
        let want = openclip_shape(rule);
        if src.shape.as_slice() != want.as_slice() {
            let msg = format!(
                "tensor {} has shape {:?}, the config expects {want:?}",
                rule.openclip,
                src.shape.as_slice()
            );
            if !errors.contains(&msg) {
                errors.push(msg);
            }
            continue;
        }
        let x = f32s(src);
        let values = match rule.layout {
            Layout::Same | Layout::Scalar => x,
            Layout::Transposed => transpose(&x, want[0], want[1]),
            Layout::InProjWeight(part) => {
                let w = rule.shape[0];
                transpose(&x[part * w * w..(part + 1) * w * w], w, w)
            }
            Layout::InProjBias(part) => {
                let w = rule.shape[0];
                x[part * w..(part + 1) * w].to_vec()
            }
        };
        out.insert(
            rule.clipa.clone(),
            TensorData::new(values, rule.shape.clone()),
        );
    }
    let known: BTreeSet<&str> = rules.iter().map(|r| r.openclip.as_str()).collect();
    // OpenCLIP keeps the causal mask as a non-persistent buffer; older
    // checkpoints carry `attn_mask` anyway, and it holds no weights.
    let extra: Vec<&String> = openclip
        .keys()
        .filter(|k| !known.contains(k.as_str()) && !k.ends_with("attn_mask"))
        .collect();
    if !extra.is_empty() {
        errors.push(format!(
            "unexpected tensor(s) {}",
            extra
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Error::StateDict(errors.join("; ")))
    }
}

/// Converts clipa parameters (or gradients) to OpenCLIP keys and layouts.
/// Paths absent from `state` are skipped (a frozen sin-cos table has no
/// gradient); q/k/v are re-joined only when all three are present.
pub fn export_state(state: &StateDict, cfg: &ClipConfig, custom_text: bool) -> StateDict {
    let mut out = StateDict::new();
    let mut in_proj: BTreeMap<String, (Vec<usize>, Vec<Option<Vec<f32>>>)> = BTreeMap::new();
    for rule in rules(cfg, custom_text) {
        let Some(src) = state.get(&rule.clipa) else {
            continue;
        };
        let x = f32s(src);
        let shape = openclip_shape(&rule);
        match rule.layout {
            Layout::Same | Layout::Scalar => {
                out.insert(rule.openclip.clone(), TensorData::new(x, shape));
            }
            Layout::Transposed => {
                let t = transpose(&x, rule.shape[0], rule.shape[1]);
                out.insert(rule.openclip.clone(), TensorData::new(t, shape));
            }
            Layout::InProjWeight(part) | Layout::InProjBias(part) => {
                let w = rule.shape[0];
                let part_values = match rule.layout {
                    Layout::InProjWeight(_) => transpose(&x, w, w),
                    _ => x,
                };
                let entry = in_proj
                    .entry(rule.openclip.clone())
                    .or_insert_with(|| (shape.clone(), vec![None, None, None]));
                entry.1[part] = Some(part_values);
            }
        }
    }
    for (key, (shape, parts)) in in_proj {
        if parts.iter().all(Option::is_some) {
            let joined: Vec<f32> = parts.into_iter().flatten().flatten().collect();
            out.insert(key, TensorData::new(joined, shape));
        }
    }
    out
}

/// clipa parameter paths and shapes for `cfg`, without building a model.
pub fn clipa_shapes(cfg: &ClipConfig) -> BTreeMap<String, Vec<usize>> {
    rules(cfg, false)
        .into_iter()
        .map(|r| (r.clipa, r.shape))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::normal_data;

    const CLIPA_STYLE: &str = r#"{"embed_dim": 64,
      "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4,
        "no_ln_pre": true, "pool_type": "avg", "final_ln_after_pool": true,
        "pos_embed_type": "sin_cos_2d", "act_kwargs": {"approximate": "tanh"}},
      "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
        "no_causal_mask": true, "pool_type": "last", "act_kwargs": {"approximate": "tanh"}}}"#;

    #[test]
    fn parses_the_clipa_style_fixture_config() {
        let cfg = parse_config(CLIPA_STYLE).unwrap().clip;
        assert_eq!(cfg.vision.heads, 2);
        assert_eq!(cfg.vision.mlp_width, 256);
        assert!(!cfg.vision.ln_pre);
        assert_eq!(cfg.vision.pool, VisionPool::AvgPatches);
        assert_eq!(cfg.vision.pos_embed, PosEmbed::SinCos2d);
        assert_eq!(cfg.vision.activation, Activation::GeluTanh);
        assert!(!cfg.text.causal);
        assert_eq!(cfg.text.pool, TextPool::Last);
        // what we write parses back to the same model
        let again = parse_config(&config_json(&cfg, false).to_string())
            .unwrap()
            .clip;
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let bad = CLIPA_STYLE.replace("\"no_ln_pre\": true", "\"no_ln_pre\": true, \"rope\": true");
        let err = parse_config(&bad).unwrap_err().to_string();
        assert!(err.contains("unsupported key(s) vision_cfg.rope"), "{err}");
        let bad = CLIPA_STYLE.replace("\"pool_type\": \"last\"", "\"pool_type\": \"mean\"");
        let err = parse_config(&bad).unwrap_err().to_string();
        assert!(
            err.contains("unsupported value \"mean\" for 'text_cfg.pool_type'"),
            "{err}"
        );
        let bad = CLIPA_STYLE.replace(
            "\"embed_dim\": 64,",
            "\"embed_dim\": 64, \"init_logit_bias\": -10,",
        );
        assert!(
            parse_config(&bad)
                .unwrap_err()
                .to_string()
                .contains("init_logit_bias")
        );
    }

    #[test]
    fn export_inverts_import_bit_for_bit() {
        let cfg = ClipConfig::tiny();
        let clipa: StateDict = clipa_shapes(&cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (k, s))| (k, normal_data(s, i as u64, 1.0)))
            .collect();
        for custom_text in [false, true] {
            let oc = export_state(&clipa, &cfg, custom_text);
            assert_eq!(oc["logit_scale"].shape.as_slice(), &[] as &[usize]);
            assert_eq!(
                oc["visual.transformer.resblocks.1.attn.in_proj_weight"]
                    .shape
                    .as_slice(),
                &[192, 64]
            );
            let back = import_state(&oc, &cfg, custom_text).unwrap();
            assert_eq!(back, clipa);
        }
    }

    #[test]
    fn in_proj_rows_are_q_then_k_then_v() {
        let cfg = ClipConfig::tiny();
        let mut oc = export_state(
            &clipa_shapes(&cfg)
                .into_iter()
                .map(|(k, s)| (k, normal_data(s, 0, 1.0)))
                .collect(),
            &cfg,
            false,
        );
        // in_proj_weight[64 + 3][5] is Wk[3][5] (out 3, in 5) = clipa key.weight[5][3].
        let key = "visual.transformer.resblocks.0.attn.in_proj_weight";
        let mut values = oc[key].to_vec::<f32>().unwrap();
        values[(64 + 3) * 64 + 5] = 42.0;
        oc.insert(key.to_string(), TensorData::new(values, [192, 64]));
        let clipa = import_state(&oc, &cfg, false).unwrap();
        let k = clipa["visual.blocks.0.attn.key.weight"]
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(k[5 * 64 + 3], 42.0);
    }

    #[test]
    fn import_names_bad_tensors() {
        let cfg = ClipConfig::tiny();
        let mut oc = export_state(
            &clipa_shapes(&cfg)
                .into_iter()
                .map(|(k, s)| (k, normal_data(s, 0, 1.0)))
                .collect(),
            &cfg,
            false,
        );
        oc.remove("ln_final.bias");
        oc.insert(
            "visual.proj".into(),
            TensorData::new(vec![0f32; 64 * 32], [64, 32]),
        );
        oc.insert("visual.extra".into(), TensorData::new(vec![0f32], [1]));
        let err = import_state(&oc, &cfg, false).unwrap_err().to_string();
        assert!(err.contains("missing tensor ln_final.bias"), "{err}");
        assert!(
            err.contains("tensor visual.proj has shape [64, 32], the config expects [64, 64]"),
            "{err}"
        );
        assert!(err.contains("unexpected tensor(s) visual.extra"), "{err}");
    }
}
