//! The gradient machinery of a training step: the loss and every
//! parameter's gradient of one batch, with OpenCLIP's two-pass
//! cached-feature accumulation (`--accum-freq`) over micro-batches, the
//! replicas' feature all-gather (`--local-loss --gather-with-grad`) and
//! per-block recomputation (`--grad-checkpointing`).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};

use super::batch::DeviceBatch;
use super::lit::{Frozen, first_trained_block, stem_trains};
use crate::Result;
use crate::dist::Replica;
use crate::loss::{LossKind, contrastive_loss, contrastive_loss_rows};
use crate::model::{ClipModel, Trace, l2_normalize};
use crate::nn::ResidualBlock;

/// The gradient of the global loss with respect to one replica's features,
/// found without a graph through the towers.
struct FeatureGrads<B: AutodiffBackend> {
    /// The loss of the global batch `[1]`, on the device.
    loss: Tensor<B::InnerBackend, 1>,
    /// `d loss / d features` of this replica's rows, image then text
    /// columns: `[local, 2·dim]`.
    local: Tensor<B::InnerBackend, 2>,
    /// This replica's part of `d loss / d logit_scale` (the parts add up
    /// when the replicas' parameter gradients are summed).
    scale: Tensor<B::InnerBackend, 1>,
    /// Likewise for the SigLIP bias.
    bias: Option<Tensor<B::InnerBackend, 1>>,
}

/// All-gathers the replicas' features `local` `[local, 2·dim]` (each
/// replica writes its rows into its slot of a zero `[global, 2·dim]`
/// matrix, and the sum over replicas fills every slot), differentiates this
/// replica's share of the loss with respect to the whole gathered matrix,
/// and sums those gradients over replicas: the sum's slot for this replica
/// is the gradient of the global loss on its features. That second sum is
/// the backward of the all-gather (OpenCLIP `gather_with_grad`), written
/// out because Burn's all-reduce has no backward pass. With one replica
/// both sums are the identity.
fn feature_grads<B: AutodiffBackend>(
    kind: LossKind,
    local: Tensor<B::InnerBackend, 2>,
    scale: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    replica: &Replica<B>,
) -> Result<FeatureGrads<B>> {
    let [n, two_dim] = local.dims();
    let dim = two_dim / 2;
    let (world, offset) = (replica.world(), replica.rank() * n);
    let gathered = if world == 1 {
        local
    } else {
        let device = local.device();
        Tensor::zeros([n * world, two_dim], &device)
            .slice_assign([offset..offset + n, 0..two_dim], local)
    };
    let all = Tensor::<B, 2>::from_inner(replica.sum(gathered)?).require_grad(); // [global, 2·dim]
    let scale = Tensor::<B, 1>::from_inner(scale.inner()).require_grad();
    let bias = bias.map(|b| Tensor::<B, 1>::from_inner(b.inner()).require_grad());
    let share = contrastive_loss_rows(
        kind,
        all.clone().narrow(1, 0, dim),
        all.clone().narrow(1, dim, dim),
        offset,
        n,
        scale.clone(),
        bias.clone(),
    ) / world as f32; // [1]
    let grads = share.backward();
    let reached = "the loss depends on the features, the temperature and the bias";
    let all_grad = all.grad(&grads).expect(reached); // [global, 2·dim]
    let scale_grad = scale.grad(&grads).expect(reached);
    let bias_grad = bias.map(|b| b.grad(&grads).expect(reached));
    let local = replica.sum(all_grad)?.narrow(0, offset, n); // [local, 2·dim]
    let loss = replica.sum(share.inner())?; // [1]
    Ok(FeatureGrads {
        loss,
        local,
        scale: scale_grad,
        bias: bias_grad,
    })
}

/// A scalar whose gradient through the towers is the chain rule from
/// `grads` (rows `at..at + n` of them) into the fresh features `image`,
/// `text` `[n, dim]`; with `model`, also through the temperature and bias.
fn surrogate<B: AutodiffBackend>(
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    grads: &FeatureGrads<B>,
    at: usize,
    model: Option<&ClipModel<B>>,
) -> Tensor<B, 1> {
    let [n, dim] = image.dims();
    let g = grads.local.clone().narrow(0, at, n); // [n, 2·dim]
    let mut s = (image * Tensor::from_inner(g.clone().narrow(1, 0, dim))).sum()
        + (text * Tensor::from_inner(g.narrow(1, dim, dim))).sum();
    if let Some(model) = model {
        s = s + (model.logit_scale.val() * Tensor::from_inner(grads.scale.clone())).sum();
        if let (Some(b), Some(g)) = (model.bias(), &grads.bias) {
            s = s + (b * Tensor::from_inner(g.clone())).sum();
        }
    }
    s
}

/// Loss and summed gradients of one batch, split into `micro`
/// micro-batches, on one replica of `replica.world()`.
///
/// - One replica, `micro = 1`: a plain forward/backward.
/// - Otherwise the loss is taken on features that do not carry a graph,
///   and the towers are back-propagated with the loss's gradient on their
///   features ([`feature_grads`], [`surrogate`]). Several replicas gather
///   their features first. With micro-batches (OpenCLIP `train.py`,
///   `accum_freq > 1`), a no-grad pass computes every micro-batch's
///   features, the loss gradient is taken once on all of them (so every
///   image meets every caption of the global batch), and each micro-batch
///   is then recomputed with a graph and back-propagated with its rows of
///   that gradient: the gradients add up to those of the full batch. The
///   temperature (and bias) take their gradient with the first
///   micro-batch only — counting it `micro` times (as OpenCLIP does) would
///   scale it by `micro`.
///
/// The replicas' parameter gradients are then summed, so every replica
/// holds the gradient of the global batch's loss.
///
/// `checkpoint` back-propagates each (micro-)batch one transformer block at
/// a time ([`backward_through`]): activation memory falls from all blocks'
/// to one block's, for one more forward pass of compute.
///
/// A little over one screen: the micro-batch loop and its two gradient
/// passes (features, then parameters) read best together.
pub fn loss_and_grads<B: AutodiffBackend>(
    model: &ClipModel<B>,
    batch: &DeviceBatch<B>,
    kind: LossKind,
    micro: usize,
    checkpoint: bool,
    frozen: Frozen,
    replica: &Replica<B>,
) -> Result<(Tensor<B::InnerBackend, 1>, GradientsParams)> {
    // The softmax loss has no bias, even where the model carries one.
    let bias = |model: &ClipModel<B>| match kind {
        LossKind::Sigmoid => model.bias(),
        LossKind::Softmax => None,
    };
    let (loss, grads) = if micro == 1 {
        backward_through(
            model,
            batch.images.clone(),
            batch.keep.clone(),
            batch.ids.clone(),
            checkpoint,
            frozen,
            |model, img, txt| {
                if replica.world() == 1 {
                    let bias = bias(model);
                    let loss = contrastive_loss(kind, img, txt, model.logit_scale.val(), bias);
                    let value = loss.clone().inner(); // [1], stays on the device
                    return Ok((loss, value));
                }
                let features = Tensor::cat(vec![img.clone().inner(), txt.clone().inner()], 1);
                let g = feature_grads(
                    kind,
                    features,
                    model.logit_scale.val(),
                    bias(model),
                    replica,
                )?;
                Ok((surrogate(img, txt, &g, 0, Some(model)), g.loss))
            },
        )?
    } else {
        let n = batch.ids.dims()[0];
        let size = n / micro;
        let slice4 = |t: &Tensor<B, 4>, j: usize| t.clone().narrow(0, j * size, size);
        let slice2 = |t: &Tensor<B, 2, Int>, j: usize| t.clone().narrow(0, j * size, size);
        let inner = model.valid();
        // [local, 2·dim]: each micro-batch's image then text features, no graph.
        let cached = Tensor::cat(
            (0..micro)
                .map(|j| {
                    let img = inner.encode_image(
                        slice4(&batch.images, j).inner(),
                        batch.keep.as_ref().map(|k| slice2(k, j).inner()),
                    );
                    let txt = inner.encode_text(slice2(&batch.ids, j).inner());
                    Tensor::cat(vec![l2_normalize(img), l2_normalize(txt)], 1)
                })
                .collect(),
            0,
        );
        drop(inner);
        let g = feature_grads(kind, cached, model.logit_scale.val(), bias(model), replica)?;
        let mut acc = GradientsAccumulator::<ClipModel<B>>::new();
        for j in 0..micro {
            let (_, grads) = backward_through(
                model,
                slice4(&batch.images, j),
                batch.keep.as_ref().map(|k| slice2(k, j)),
                slice2(&batch.ids, j),
                checkpoint,
                frozen,
                |model, img, txt| {
                    Ok((
                        surrogate(img, txt, &g, j * size, (j == 0).then_some(model)),
                        g.loss.clone(),
                    ))
                },
            )?;
            acc.accumulate(model, grads);
        }
        (g.loss, acc.grads())
    };
    Ok((loss, replica.sum_grads(model, grads)?))
}

/// Unit image and text features `[batch, dim]` each. A tower in `frozen`
/// runs on the inner backend, so its forward pass records no graph and
/// keeps no activations for a backward pass it will not have.
fn features<B: AutodiffBackend>(
    model: &ClipModel<B>,
    images: Tensor<B, 4>,
    keep: Option<Tensor<B, 2, Int>>,
    ids: Tensor<B, 2, Int>,
    frozen: Frozen,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    if frozen == Frozen::default() {
        return model.features(images, keep, ids, &mut Trace::off());
    }
    let image = match frozen.whole_image() {
        true => Tensor::from_inner(
            model
                .visual
                .valid()
                .forward(images.inner(), keep.map(Tensor::inner)),
        ),
        false => model.visual.forward(images, keep),
    };
    let text = match frozen.whole_text() {
        true => Tensor::from_inner(model.text.valid().forward(ids.inner())),
        false => model.text.forward(ids),
    };
    (l2_normalize(image), l2_normalize(text))
}

/// Computes unit image and text features with gradients, reduces them to a
/// loss with `loss_of` (which gets the model whose parameters carry the
/// graph, for the temperature and bias, and returns the scalar to
/// back-propagate and the loss value to report), and back-propagates it to
/// every parameter.
///
/// With `checkpoint` (per-block activation checkpointing, OpenCLIP's
/// `--grad-checkpointing`), the towers first run without a graph, keeping
/// only each block's input `[batch, tokens, width]`. The heads and the loss
/// then run with gradients up to the last block's output; each block is
/// recomputed from its kept input and back-propagated with the gradient
/// that arrived at its output (the backward of `sum(y · g)` is exactly the
/// chain rule through the block), last block first; the stems close the
/// chain. Only one block's activations are alive at a time.
///
/// Long because its three phases (heads, blocks last to first, stems) share
/// the kept block inputs and one accumulator, and the leaf renewal at its
/// top carries the Burn bug it works around.
pub fn backward_through<B: AutodiffBackend>(
    model: &ClipModel<B>,
    images: Tensor<B, 4>,
    keep: Option<Tensor<B, 2, Int>>,
    ids: Tensor<B, 2, Int>,
    checkpoint: bool,
    frozen: Frozen,
    loss_of: impl FnOnce(
        &ClipModel<B>,
        Tensor<B, 2>,
        Tensor<B, 2>,
    ) -> Result<(Tensor<B, 1>, Tensor<B::InnerBackend, 1>)>,
) -> Result<(Tensor<B::InnerBackend, 1>, GradientsParams)> {
    // Fresh autodiff leaves for every parameter (the same buffers and
    // parameter ids, new graph nodes), so that no leaf that an earlier
    // backward pass consumed is reused: Burn 0.21 drops a consumed leaf's
    // graph entry, the next op on it starts a one-node graph, and a
    // `backward()` on another thread (a replica) can sweep that graph while
    // its child op is still being registered, silently losing the
    // parameter's gradient (tracel-ai/burn#5573, fixed after 0.21 by #5647).
    // That happened here with micro-batches and checkpointing, which run
    // several backward passes per optimiser step: conv1's gradient came out
    // 13–340 % wrong in about 1 run in 100 of the 4-replica test. The
    // phases below (heads, each block, the stems) use disjoint parameters,
    // so one renewal per call covers them all.
    let renewed = ClipModel::from_inner(model.valid());
    let model = &renewed;
    if !checkpoint {
        let (img, txt) = features(model, images, keep, ids, frozen);
        let (loss, value) = loss_of(model, img, txt)?;
        return Ok((value, GradientsParams::from_grads(loss.backward(), model)));
    }
    let (vision, text) = (&model.visual, &model.text);
    let causal = text.config.causal;
    // Forward without a graph; `[input of block 0, …, output of the last]`.
    let inner = model.valid();
    let chain =
        |mut x: Tensor<B::InnerBackend, 3>, blocks: &[ResidualBlock<B::InnerBackend>], causal| {
            let mut kept = Vec::with_capacity(blocks.len() + 1);
            for block in blocks {
                kept.push(x.clone());
                x = block.forward(x, causal);
            }
            kept.push(x);
            kept
        };
    let v_kept = chain(
        inner
            .visual
            .embed(images.clone().inner(), keep.clone().map(Tensor::inner)),
        &inner.visual.blocks,
        false,
    );
    let t_kept = chain(
        inner.text.embed(ids.clone().inner()),
        &inner.text.blocks,
        causal,
    );
    drop(inner);

    let mut acc = GradientsAccumulator::<ClipModel<B>>::new();
    // Heads and loss, from the last blocks' outputs.
    // Where each tower's backward pass stops (a locked tower's lowest
    // trained group); a top below which nothing trains needs no gradient.
    let (v_first, t_first) = (
        first_trained_block(vision.blocks.len(), frozen.image),
        first_trained_block(text.blocks.len(), frozen.text),
    );
    let top = |kept: &[Tensor<B::InnerBackend, 3>], trains: bool| {
        let x = Tensor::<B, 3>::from_inner(kept[kept.len() - 1].clone());
        if trains { x.require_grad() } else { x }
    };
    let v_train = v_first < vision.blocks.len() || stem_trains(vision.blocks.len(), frozen.image);
    let t_train = t_first < text.blocks.len() || stem_trains(text.blocks.len(), frozen.text);
    let v_top = top(&v_kept, v_train);
    let t_top = top(&t_kept, t_train);
    let img = l2_normalize(vision.pool(v_top.clone()));
    let txt = l2_normalize(text.pool(t_top.clone(), ids.clone()));
    let (loss, value) = loss_of(model, img, txt)?;
    let grads = loss.backward();
    let output_grad = |x: &Tensor<B, 3>, grads: &B::Gradients| {
        x.grad(grads)
            .expect("the checkpointed chain reaches every block")
    };
    // [batch, tokens, width]; `None` where nothing below the top trains.
    let mut v_grad = v_train.then(|| output_grad(&v_top, &grads));
    let mut t_grad = t_train.then(|| output_grad(&t_top, &grads));
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    // Blocks, last to first: recompute, then back-propagate `v_grad`.
    let mut through = |block: &ResidualBlock<B>, input: &Tensor<B::InnerBackend, 3>, g, causal| {
        let x = Tensor::<B, 3>::from_inner(input.clone()).require_grad();
        let y = block.forward(x.clone(), causal);
        let grads = (y * Tensor::from_inner(g)).sum().backward();
        let dx = output_grad(&x, &grads);
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
        dx
    };
    if let Some(g) = v_grad.as_mut() {
        for (block, input) in vision.blocks.iter().zip(&v_kept).skip(v_first).rev() {
            *g = through(block, input, g.clone(), false);
        }
    }
    if let Some(g) = t_grad.as_mut() {
        for (block, input) in text.blocks.iter().zip(&t_kept).skip(t_first).rev() {
            *g = through(block, input, g.clone(), causal);
        }
    }
    // The stems: patch and position embeddings, token embeddings.
    let v_stem = stem_trains(vision.blocks.len(), frozen.image);
    let t_stem = stem_trains(text.blocks.len(), frozen.text);
    let stems = [
        v_grad
            .filter(|_| v_stem)
            .map(|g| (vision.embed(images, keep) * Tensor::from_inner(g)).sum()),
        t_grad
            .filter(|_| t_stem)
            .map(|g| (text.embed(ids) * Tensor::from_inner(g)).sum()),
    ];
    if let Some(stems) = stems.into_iter().flatten().reduce(|a, b| a + b) {
        acc.accumulate(model, GradientsParams::from_grads(stems.backward(), model));
    }
    Ok((value, acc.grads()))
}

#[cfg(test)]
mod tests;
