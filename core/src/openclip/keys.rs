//! OpenCLIP state-dict keys and layouts ↔ clipa parameter paths.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::TensorData;

use crate::model::ClipConfig;
use crate::state::StateDict;
use crate::{Error, Result};

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

/// Every key-mapping rule of `cfg`, OpenCLIP's layout beside ours.
///
/// Long because it is a table: one `add` per parameter kind of each tower,
/// in OpenCLIP's state-dict order, so it reads against `model.py` line by
/// line; split up, the order would have to be reassembled by the reader.
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
    if cfg.init_logit_bias.is_some() {
        // SigLIP-trained models (OpenCLIP `CustomTextCLIP` with `init_logit_bias`).
        add(&mut r, "logit_bias", "logit_bias", Layout::Scalar, vec![1]);
    }
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
    // OpenCLIP key → (shape, the q/k/v parts seen so far).
    type Parts = (Vec<usize>, Vec<Option<Vec<f32>>>);
    let mut in_proj: BTreeMap<String, Parts> = BTreeMap::new();
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
