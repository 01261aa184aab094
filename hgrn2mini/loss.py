"""The fused loss head: cross-entropy of x @ weight^T without materializing the [N, vocab] logits
(fla's `fuse_linear_cross_entropy`)."""

from __future__ import annotations

import torch

# Logits per chunk of rows, at most: 512 MB in fp32. Under torch.compile the loop over chunks is
# unrolled, and each chunk adds to the compile time: few, equal chunks (4 of 4096 rows at 8 x 2048
# tokens, vocabulary 32000).
CE_CHUNK_LOGITS = 1 << 27


def _cross_entropy_chunks(x, weight, targets, grads: bool):
    """Loss sum over rows, count of rows not ignored (-100), and with `grads` the gradients of the
    mean loss for x and weight (fp32). Rows go in equal chunks of at most CE_CHUNK_LOGITS / vocab
    (the last may be shorter); each chunk's logits are rounded to the matmul's dtype as `lm_head`
    gives them, then fp32."""
    count = (targets != -100).sum()
    N = x.shape[0]
    chunks = -(-N // max(1, CE_CHUNK_LOGITS // weight.shape[0]))
    rows = -(-N // chunks)
    total = x.new_zeros((), dtype=torch.float32)
    dx, dw = [], torch.zeros_like(weight, dtype=torch.float32) if grads else None
    for r in range(0, N, rows):
        xc, tc = x[r : r + rows], targets[r : r + rows]
        logits = (xc @ weight.T).float()  # [rows, vocab]
        lse = torch.logsumexp(logits, -1)
        keep = tc != -100
        label = torch.where(keep, tc, 0)[:, None]
        total = total + torch.where(keep, lse - logits.gather(1, label)[:, 0], 0.0).sum()
        if grads:  # d mean / d logits = (softmax - onehot) / count on the rows kept
            onehot = torch.arange(logits.shape[1], device=x.device) == label  # elementwise: one fused kernel
            dl = ((torch.exp(logits - lse[:, None]) - onehot.float()) * (keep[:, None] / count)).to(x.dtype)
            dx.append(dl @ weight)
            dw = dw + (dl.T @ xc).float()
    return total, count, (torch.cat(dx) if grads else None), dw


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in the forward, chunk by chunk, and kept: [N, D] and [vocab, D]
    instead of the [N, vocab] logits and their gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        total, count, dx, dw = _cross_entropy_chunks(x, weight, targets, grads=True)
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = x.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (grad * dx).to(ctx.dtypes[0]), (grad * dw).to(ctx.dtypes[1]), None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-100) (mean over the rows kept) without
    the logits: x [N, D], weight [vocab, D], targets [N]. Peak memory is one chunk's logits; for
    training the gradients are made in the forward (the same matmuls as the unfused backward)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [vocab, D] with D = {x.shape[1]} as x, got shape {list(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must be [N] = [{x.shape[0]}] as x, got shape {list(targets.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    total, count, _, _ = _cross_entropy_chunks(x, weight, targets, grads=False)
    return total / count
